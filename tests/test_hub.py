"""sanaflow.hub: save / load in the diffusers folder layout, and the errors of bad checkpoints."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from torch import nn

from sanaflow.errors import CheckpointError, ConfigError, SanaflowError
from sanaflow.hub import ModelMixin, find_weight_files, register_to_config, resolve_model_path


class TinyNet(ModelMixin):
    """A two-layer MLP with a norm and a computed buffer: enough to exercise the loader."""

    diffusers_class_name = "TinyNet"

    @register_to_config
    def __init__(self, in_channels: int = 4, hidden_size: int = 8, num_layers: int = 2, out_channels: int | None = None):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        out_channels = out_channels or in_channels
        self.layers = nn.ModuleList(
            [nn.Linear(in_channels if i == 0 else hidden_size, hidden_size) for i in range(num_layers)]
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.proj_out = nn.Linear(hidden_size, out_channels)
        self.register_buffer("steps", torch.arange(4), persistent=True)  # an integer tensor: never cast
        self._init_computed_buffers()

    def _init_computed_buffers(self) -> None:
        # Not in checkpoints (persistent=False): rebuilt after loading on the meta device.
        self.register_buffer("scale", torch.full((1,), 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))  # (N, hidden)
        return self.proj_out(self.norm(x)) * self.scale  # (N, out)


def _model(**kwargs) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(**kwargs).eval()


@pytest.fixture
def saved(tmp_path):
    model = _model(hidden_size=16)
    model.save_pretrained(tmp_path / "net")
    return model, tmp_path / "net"


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k].to(sa[k].dtype)), k


def test_round_trip(saved):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "TinyNet" and config["hidden_size"] == 16 and config["out_channels"] is None
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    loaded = TinyNet.from_pretrained(folder)
    assert dict(loaded.config) == dict(model.config)
    assert loaded.config.hidden_size == 16 and not loaded.training
    _assert_same(model, loaded)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(AttributeError, match="read-only"):
        loaded.config.hidden_size = 3


def test_subfolder_and_torch_dtype(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = TinyNet.from_pretrained(tmp_path / "pipe", subfolder="transformer", torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.dtype == torch.bfloat16 and loaded.device == torch.device("cpu")
    assert loaded.steps.dtype == torch.long  # integer tensors keep their dtype
    _assert_same(loaded, model)  # same values after rounding to bf16
    assert TinyNet.from_pretrained(tmp_path / "pipe" / "transformer").proj_out.weight.dtype == torch.float32
    with pytest.raises(CheckpointError, match="no subfolder 'vae'"):
        TinyNet.from_pretrained(tmp_path / "pipe", subfolder="vae")
    with pytest.raises(ConfigError, match="torch_dtype"):
        TinyNet.from_pretrained(tmp_path / "pipe", subfolder="transformer", torch_dtype="bf16")


def test_sharded_save_and_load(tmp_path):
    model = _model(hidden_size=32, num_layers=3)
    folder = model.save_pretrained(tmp_path / "net", max_shard_size=2000)  # bytes: forces several shards
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0].endswith(f"-00001-of-{len(shards):05d}.safetensors")
    assert set(index["weight_map"]) == set(model.state_dict())
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    assert [p.name for p in find_weight_files(folder)] == shards
    _assert_same(model, TinyNet.from_pretrained(folder))

    # Saving again unsharded into the same folder must not leave the old index to shadow the new file.
    other = _model(hidden_size=32, num_layers=3)
    with torch.no_grad():
        other.proj_out.weight.add_(1.0)
    other.save_pretrained(folder)
    assert not (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert not list(folder.glob("*-of-*.safetensors"))
    _assert_same(other, TinyNet.from_pretrained(folder))


def test_missing_shard(tmp_path):
    folder = _model(hidden_size=32).save_pretrained(tmp_path / "net", max_shard_size=2000)
    victim = sorted(folder.glob("*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        TinyNet.from_pretrained(folder)


def test_folder_without_config(saved):
    _, folder = saved
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        TinyNet.from_pretrained(folder)


def test_bad_config_json(saved):
    _, folder = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        TinyNet.from_pretrained(folder)


def test_truncated_safetensors(saved):
    _, folder = saved
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    for cut in (len(data) - 100, 20):  # in the tensor data, then inside the header
        weights.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors") as err:
            TinyNet.from_pretrained(folder)
        assert "truncated or corrupt" in str(err.value)


def test_pickle_only_folder(saved, tmp_path):
    model, folder = saved
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle.*diffusion_pytorch_model\.bin.*allow_pickle=True"):
        TinyNet.from_pretrained(folder)
    _assert_same(model, TinyNet.from_pretrained(folder, allow_pickle=True))


def test_missing_and_unexpected_keys(saved):
    model, folder = saved
    from safetensors.torch import save_file

    state = dict(model.state_dict())
    state["extra.weight"] = torch.zeros(2)
    del state["norm.bias"]
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        TinyNet.from_pretrained(folder)
    msg = str(err.value)
    assert "missing keys: norm.bias" in msg and "unexpected keys: extra.weight" in msg and str(folder) in msg


def test_wrong_shapes(saved):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 12  # the checkpoint was made with 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"wrong shape.*layers\.0\.weight: checkpoint \(16, 4\) vs model \(12, 4\)"):
        TinyNet.from_pretrained(folder)


def test_unknown_config_key(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["hiden_size"] = config.pop("hidden_size")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"'hiden_size' \(did you mean 'hidden_size'\?\)"):
        TinyNet.from_pretrained(folder)
    with pytest.raises(ConfigError, match="num_layer.*did you mean 'num_layers'"):
        TinyNet.from_config({"num_layer": 3})


def test_missing_required_config_key(tmp_path):
    class NeedsSize(TinyNet):
        @register_to_config
        def __init__(self, size: int, in_channels: int = 4):
            super().__init__(in_channels=in_channels, hidden_size=size)

    with pytest.raises(ConfigError, match="missing.*'size'"):
        NeedsSize.from_config({"in_channels": 4})


def test_hub_repo_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)  # so 'owner/name' is not accidentally a local folder

    def refuse(*args, **kwargs):
        raise AssertionError("network access although HF_HUB_OFFLINE=1")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(CheckpointError, match=r"'someone/sana-model'.*offline.*HF_HUB_OFFLINE") as err:
        TinyNet.from_pretrained("someone/sana-model", subfolder="transformer")
    assert "local" in str(err.value)


def test_unresolvable_references(tmp_path):
    with pytest.raises(CheckpointError, match="not a hub repo id"):
        resolve_model_path(str(tmp_path / "does" / "not" / "exist"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model_path(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"_class_name": "TinyNet"}))
    with pytest.raises(CheckpointError, match="no weights in"):
        TinyNet.from_pretrained(empty)
    for name in ("a.safetensors", "b.safetensors"):
        (empty / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"several safetensors files \(a.safetensors, b.safetensors\)"):
        TinyNet.from_pretrained(empty)
    assert issubclass(CheckpointError, SanaflowError) and issubclass(ConfigError, SanaflowError)


def test_model_spec_names_resolve(monkeypatch):
    from sanaflow.errors import CheckpointError
    from sanaflow.hub import DEFAULT_MODEL, builtin_path, resolve_model_path

    assert resolve_model_path("shapes-tiny") == builtin_path(DEFAULT_MODEL)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Sana_600M_1024px_diffusers"):
        resolve_model_path("sana-600m-1024")  # the spec's official repo, offline here
    with pytest.raises(CheckpointError, match="did you mean 'sana-600m-1024'"):
        resolve_model_path("sana-600m-1042")


def test_frozen_config_copies_and_pickles():
    import copy
    import pickle

    from sanaflow.hub import FrozenConfig

    cfg = FrozenConfig({"width": 8, "blocks": [1, 2]})
    for other in (copy.deepcopy(cfg), copy.copy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert isinstance(other, FrozenConfig) and other == cfg and other.width == 8
    deep = copy.deepcopy(cfg)
    assert deep["blocks"] is not cfg["blocks"]  # a deep copy owns its values
    with pytest.raises(AttributeError):
        _ = cfg._missing  # private names are never config keys (and never recurse)
    with pytest.raises(AttributeError, match="read-only"):
        cfg.width = 3


def test_atomic_outputs_get_umask_permissions(tmp_path):
    import os

    from safetensors.torch import save_file

    from sanaflow.utils import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:  # safetensors writes its files 0600
            save_file({"x": torch.zeros(2)}, str(tmp))
        with atomic_path(tmp_path / "folder") as tmp:
            tmp.mkdir()
            save_file({"x": torch.zeros(2)}, str(tmp / "inner.safetensors"))
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder" / "inner.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "change, match",
    [
        ({"hidden_size": "abc"}, r"wrong value type.*hidden_size='abc' \(int expected\)"),
        ({"num_layers": True}, r"wrong value type.*num_layers"),
        ({"num_layers": 2.5}, r"wrong value type.*num_layers"),
        ({"out_channels": "x"}, r"out_channels='x' \(int \| None expected\)"),
        ({"num_layers": -3}, r"no negative or non-finite numbers: num_layers=-3"),
        ({"in_channels": 0, "out_channels": 0}, r"sizes and counts must be >= 1.*in_channels=0"),  # before the constructor
    ],
)
def test_config_json_values_are_checked(saved, change, match):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=match):
        TinyNet.from_pretrained(folder)
    with pytest.raises(ConfigError, match=match):
        TinyNet.from_config({**config, **change})


def test_integer_weights_dtypes_and_devices_are_refused_clearly(saved, tmp_path):
    from safetensors.torch import save_file

    model, folder = saved
    save_file({k: (v * 100).to(torch.int32) for k, v in model.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="non-floating-point tensors where the model has weights"):
        TinyNet.from_pretrained(folder)
    with pytest.raises(ConfigError, match="floating-point torch.dtype"):
        TinyNet.from_pretrained(folder, torch_dtype=torch.int8)
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        TinyNet.from_pretrained(folder, device="gpu")
    torch.save([1, 2, 3], tmp_path / "diffusion_pytorch_model.bin")  # a pickle that is no state dict
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        TinyNet.from_pretrained(tmp_path, allow_pickle=True)


def test_bad_shard_index_entries(saved):
    model, folder = saved
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 5}}))
    with pytest.raises(CheckpointError, match="bad entries: a: 5"):
        find_weight_files(folder)


def test_save_pretrained_sizes_and_targets(tmp_path):
    from sanaflow.errors import InputError
    from sanaflow.hub import parse_size_bytes

    assert parse_size_bytes("5GB") == 5 * 10**9 and parse_size_bytes("2GiB") == 2 * 2**30
    assert parse_size_bytes(" 1.5 mb ") == 1_500_000 and parse_size_bytes(None) is None
    model = _model(hidden_size=32, num_layers=3)
    folder = model.save_pretrained(tmp_path / "net", max_shard_size="2KB")  # diffusers-style size string
    assert len(list(folder.glob("*-of-*.safetensors"))) >= 3
    _assert_same(model, TinyNet.from_pretrained(folder))
    for bad in ("1 GBs", "-5", 0, -5, 1.5, True):
        with pytest.raises(InputError, match="max_shard_size"):
            model.save_pretrained(tmp_path / f"bad{bad}", max_shard_size=bad)
        assert not (tmp_path / f"bad{bad}").exists()  # refused before the folder is made
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="it is a file"):
        model.save_pretrained(tmp_path / "afile")
    with pytest.raises(InputError, match="needs a folder path"):
        model.save_pretrained("")


def test_failed_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    import sanaflow.hub as hub

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    model = _model(hidden_size=16)
    with monkeypatch.context() as m:  # the weights write fails: no empty folder is left
        m.setattr("safetensors.torch.save_file", disk_full)
        with pytest.raises(OSError):
            model.save_pretrained(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    model.save_pretrained(tmp_path / "net")
    (tmp_path / "net" / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in (tmp_path / "net").iterdir()}
    with monkeypatch.context() as m:  # the config write fails: the earlier save stays whole
        m.setattr(hub, "atomic_write_text", disk_full)
        with pytest.raises(OSError):
            _model(hidden_size=8).save_pretrained(tmp_path / "net")
    assert {p.name: p.read_bytes() for p in (tmp_path / "net").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]  # no staging folder left
    other = _model(hidden_size=8)
    other.save_pretrained(tmp_path / "net")  # replaces the weights and the config, keeps the user's file
    _assert_same(other, TinyNet.from_pretrained(tmp_path / "net"))
    assert (tmp_path / "net" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("target", [None, 5, "", "  ", "afile/sub"])
def test_save_targets_are_checked(tmp_path, target):
    (tmp_path / "afile").write_text("x")
    if target == "afile/sub":
        target = tmp_path / "afile" / "sub"
    with pytest.raises(SanaflowError):
        _model().save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_meta_weights_are_not_saved(tmp_path):
    with torch.device("meta"):
        model = TinyNet()
    with pytest.raises(SanaflowError, match="meta device"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("config", [None, {1: 2}, ["in_channels", 4]])
def test_from_config_needs_a_mapping(config):
    with pytest.raises(ConfigError, match="must be a mapping"):
        TinyNet.from_config(config)


@pytest.mark.parametrize("ref", [5, "", 1.5])
def test_model_references_must_be_paths_or_names(ref):
    with pytest.raises(SanaflowError, match="model reference"):
        resolve_model_path(ref)


def test_a_config_of_another_class_is_refused(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderDC"}))
    with pytest.raises(CheckpointError, match="describes a AutoencoderDC, not a TinyNet"):
        TinyNet.from_pretrained(folder)


def test_a_config_json_that_is_a_folder_is_named(saved):
    import shutil

    _, folder = saved
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="is a folder; expected the JSON file config.json"):
        TinyNet.from_pretrained(folder)
    shutil.rmtree(folder / "config.json")


def test_dtype_is_another_name_for_torch_dtype(saved):
    _, folder = saved
    assert TinyNet.from_pretrained(folder, dtype=torch.float16).proj_out.weight.dtype == torch.float16
    assert TinyNet.from_pretrained(folder, dtype=torch.bfloat16, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(SanaflowError, match="disagree"):
        TinyNet.from_pretrained(folder, dtype=torch.float16, torch_dtype=torch.float32)

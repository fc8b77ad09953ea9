import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_models(monkeypatch):
    """Make building a task fail loudly: a check that passes with this fixture ran before any model was built."""
    import sanaflow.training.tasks as tasks

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the checks")

    monkeypatch.setattr(tasks, "build_t2i", refuse)
    monkeypatch.setattr(tasks, "build_dcae", refuse)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (request it with `pytest.mark.usefixtures`)."""
    # The tiny models' ops are far too small to gain from threads; contention only slows them down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny random SD pipeline folder with a ControlNet (tests/tokenflow_tiny.py), one per module."""
    from tokenflow_tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", controlnet=True)


@pytest.fixture(scope="module")
def sd(sd_folder):
    """The tiny SD folder as a TokenFlow backbone."""
    from sanaflow.tokenflow.backbones import load_backbone

    return load_backbone(sd_folder)


@pytest.fixture(scope="module")
def sana(tmp_path_factory):
    """A tiny random SANA folder as a TokenFlow backbone."""
    from sanaflow.tokenflow.backbones import load_backbone
    from tiny_sana import save_tiny_sana

    return load_backbone(save_tiny_sana(tmp_path_factory.mktemp("sana") / "tiny-sana"))

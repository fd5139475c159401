"""Model-source decisions: folders vs hub ids, and no network round trips when the hub can't be reached."""

import socket

import pytest

from handsynth import hub


@pytest.mark.parametrize("model, is_path", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", False), ("gpt2", False), ("/abs/model", True),
    ("./model", True), ("~/model", True), ("models/attentionhand/controlnet", True), ("C:\\models\\sd", True),
])
def test_looks_like_path(model, is_path):
    assert hub.looks_like_path(model) is is_path


def test_hub_reachable_follows_hf_endpoint(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        hub.hub_reachable.cache_clear()
        assert hub.hub_reachable()
        listener.close()
        hub.hub_reachable.cache_clear()
        assert not hub.hub_reachable()
    finally:
        listener.close()
        hub.hub_reachable.cache_clear()


def test_local_files_only(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub.local_files_only(tmp_path) is True          # an existing folder
    assert hub.local_files_only("owner/model") is False    # an id with a reachable hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.local_files_only("owner/model") is True
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    assert hub.local_files_only("owner/model") is True

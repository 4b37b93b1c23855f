"""siglip.train.processes: each torchrun restart keeps to its own keys of the agent store."""

from __future__ import annotations

import random


def test_each_torchrun_restart_reads_and_writes_its_own_keys_of_the_agent_store(monkeypatch):
    import torch.distributed as dist

    from siglip.train.processes import store_of_this_attempt

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert store_of_this_attempt(2) is None          # plain env:// or a rank-0 store: torch's own set-up
    server = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    restart = random.randint(0, 5)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    # A dead worker of the previous attempt left its address under the bare key.
    server.set("rank_0", "stale address")
    store = store_of_this_attempt(2)
    store.set("rank_0", "fresh address")
    assert server.get(f"siglip/attempt-{restart}/rank_0") == b"fresh address"
    assert store.get("rank_0") == b"fresh address" and server.get("rank_0") == b"stale address"

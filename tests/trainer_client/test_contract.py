"""The client's models against the real service: every answer it can give parses.

The client's models (`trainer_client.models`) and the service's response schemas
(`service/api/schemas.py`) are written twice, by hand; these tests hold them together.
"""

from __future__ import annotations

import asyncio
import uuid

from tests.trainer_client.conftest import LedgerServer, NewDataset
from trainer_client import AsyncLedgerClient


def test_a_pure_dp_release_parses_and_its_replay_too(
    ledger_server: LedgerServer, new_dataset: NewDataset
) -> None:
    """The service adds no noise to a generic pure ε-DP release: `noise_scale` is null."""
    dataset_id = new_dataset(epsilon_cap=1.0)
    key = str(uuid.uuid4())
    with ledger_server.client() as client:
        release = client.release(
            dataset_id, mechanism="pure_dp", sensitivity=1.0, epsilon=0.1, idempotency_key=key
        )
        assert release.noise_scale is None and release.epsilon == 0.1
        assert release.dataset.epsilon_spent > 0.0
        replayed = client.release(
            dataset_id, mechanism="pure_dp", sensitivity=1.0, epsilon=0.1, idempotency_key=key
        )
        assert replayed.id == release.id and replayed.ledger_seq == release.ledger_seq
        assert client.dataset(dataset_id).epsilon_spent == release.dataset.epsilon_spent


def test_a_pure_dp_release_parses_in_the_async_client(
    ledger_server: LedgerServer, new_dataset: NewDataset
) -> None:
    dataset_id = new_dataset(epsilon_cap=1.0)

    async def release_twice() -> None:
        async with AsyncLedgerClient(ledger_server.url, ledger_server.admin_key) as client:
            preview = await client.release(
                dataset_id, mechanism="pure_dp", epsilon=0.1, dry_run=True
            )
            assert preview.dry_run and preview.id is None and preview.noise_scale is None
            release = await client.release(dataset_id, mechanism="pure_dp", epsilon=0.1)
            assert release.id is not None and release.noise_scale is None
            # The preview showed the budget as the charge leaves it, and charged nothing itself.
            assert release.dataset.epsilon_spent == preview.dataset.epsilon_spent > 0.0
            assert (await client.dataset(dataset_id)).ledger_seq == release.ledger_seq

    asyncio.run(release_twice())

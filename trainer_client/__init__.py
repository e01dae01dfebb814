"""trainer_client: the Python client of the privacy ledger (docs/api.md, docs/trainer_client.md).

It speaks HTTP only (httpx): it never imports the service or the accountant,
so a trainer installs it without FastAPI, SQLAlchemy or numpy. The PyTorch
helpers live in `trainer_client.torch` and the Opacus adapter in
`trainer_client.opacus`; import those explicitly (they need torch / opacus).

    from trainer_client import LedgerClient

    with LedgerClient("http://127.0.0.1:8000", api_key) as client:
        with client.start_run("mnist", sample_rate=0.004, steps_per_epoch=250,
                              epochs=10, target_epsilon=3.0, max_grad_norm=1.0) as run:
            for epoch in run:
                ...  # train one epoch with noise multiplier epoch.noise_multiplier
"""

from trainer_client.async_client import AsyncLedgerClient, AsyncRun
from trainer_client.client import EPOCH_REFUSALS, LedgerClient, Run
from trainer_client.errors import (
    AuthError,
    BadRequest,
    BudgetExhausted,
    Conflict,
    DatasetFrozen,
    Forbidden,
    IdempotencyConflict,
    LedgerError,
    NotFound,
    RunNotActive,
    ServerError,
    TransportError,
    Unauthorized,
    ValidationError,
)
from trainer_client.inference import PrivateLabeler
from trainer_client.models import (
    ApiKey,
    Dataset,
    DecidedBy,
    Effect,
    Epoch,
    EpsilonEstimate,
    LedgerEntry,
    NoiseCalibration,
    OutsideGuarantee,
    Release,
    RunRecord,
    Shares,
    VerifyResult,
)

__version__ = "0.1.0"

__all__ = [
    "EPOCH_REFUSALS",
    "ApiKey",
    "AsyncLedgerClient",
    "AsyncRun",
    "AuthError",
    "BadRequest",
    "BudgetExhausted",
    "Conflict",
    "Dataset",
    "DatasetFrozen",
    "DecidedBy",
    "Effect",
    "Epoch",
    "EpsilonEstimate",
    "Forbidden",
    "IdempotencyConflict",
    "LedgerClient",
    "LedgerEntry",
    "LedgerError",
    "NoiseCalibration",
    "NotFound",
    "OutsideGuarantee",
    "PrivateLabeler",
    "Release",
    "Run",
    "RunNotActive",
    "RunRecord",
    "ServerError",
    "Shares",
    "TransportError",
    "Unauthorized",
    "ValidationError",
    "VerifyResult",
    "__version__",
]

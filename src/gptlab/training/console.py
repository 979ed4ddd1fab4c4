"""Lightning's console boilerplate, silenced where gptlab has already decided the question.

Each filter drops one message, and its comment names the decision that makes the message
noise. Everything else Lightning logs or warns still shows: a user's bad setting, or a
warning about a question gptlab has not decided.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable

from lightning.fabric.utilities.warnings import PossibleUserWarning

# Lightning's rank_zero_info logs through the fabric logger until lightning.pytorch is
# imported, and through the pytorch one after.
RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)

DECIDED_LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    logger: (
        # gptlab picks the device (accelerator: auto) and its Throughput line names it.
        r"GPU available: ",
        r"TPU available: ",
        # gptlab logs to TensorBoard (conf/logger); the litlogger tip is an advertisement.
        r"💡 Tip: For seamless cloud logging",
        # 1.0 in gptlab's configs means all batches, or once an epoch, as written. (The `=1`
        # messages stay: one batch where 100% was meant is a real mistake.)
        r"`Trainer\(\w+=1\.0\)` was configured so ",
        # A run ends at max_steps or max_epochs by design; the full bar and the report say so.
        r"`Trainer\.fit` stopped: `max_(steps|epochs)=",
        # The cosine schedule and the progress bar need the run's length before it starts.
        r"Loading `train_dataloader` to estimate number of stepping batches",
    )
    for logger in RANK_ZERO_LOGGERS
}
DECIDED_LOG_MESSAGES["lightning.fabric.utilities.seed"] = (
    # The seed is the config's `seed`, saved in the run's .hydra/config.yaml.
    r"Seed set to ",
)

DECIDED_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # (message, category, module that raises it)
    # Lightning's own use of torch's pytree API: only a Lightning release can change it.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
    # data.num_workers=0 is deliberate: a window is a slice of the tokens in memory, or one
    # positioned read (~5 µs) of a prepared tokens.bin, so workers would add start-up time
    # and memory, not speed.
    (r"The '\w+' does not have many workers", PossibleUserWarning, ""),
    # The module reduces the val loss over ranks itself (token-weighted), before logging it.
    (r"It is recommended to use `self\.log\('(val/\w+|step)'", UserWarning, ""),
    # Lightning counts log_every_n_steps over the whole run, not per epoch, so runs of many
    # short epochs (data=verdict) still log their train loss every log_every_n_steps steps.
    (
        r"The number of training batches \(\d+\) is smaller than the logging interval",
        PossibleUserWarning,
        "",
    ),
)


class DropMessages(logging.Filter):
    """Drops log records whose message starts with one of the given regular expressions."""

    def __init__(self, patterns: Iterable[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_lightning() -> None:
    """Install the filters above, once per process; calling it again changes nothing."""
    for name, patterns in DECIDED_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(patterns))
    for message, category, module in DECIDED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)

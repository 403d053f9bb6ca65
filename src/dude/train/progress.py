"""The training progress bar: step, loss, lr, tokens/s and ETA (tqdm)."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            # tqdm's own ETA: remaining steps at the smoothed step rate
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5)

    def update(self, loss: float, lr: float, tok_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={loss:.4f} lr={lr:.2e} tok/s={tok_s:,.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

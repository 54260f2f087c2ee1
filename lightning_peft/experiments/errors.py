"""The error of the experiment surfaces, below every module that raises it.

`records` (the files a comparison leaves), `names` and `fingerprint` raise it as well as
`compare`, so it lives here rather than in `compare`, which imports them.
"""

from __future__ import annotations

from lightning_peft.errors import InputError


class CompareError(InputError):
    """A comparison that cannot run as given, or a comparison file that cannot be read back.

    Raised before any variant trains; the message names the variant, file, row or column at fault.
    """

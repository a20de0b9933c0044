"""The errors pyengine raises for a use of the Engine that PyTorch would handle differently.

Note: a PyTorch habit the engine cannot honour exactly stops with a UsageError at the call
that makes the difference (never a later, silent divergence). Each message says what to do
instead. Bad arguments get ValueError / TypeError naming the argument, as everywhere.
"""


class UsageError(RuntimeError):
    """A use of an Engine-trained model or its optimizer that would change training in silence."""


class GradientAccessError(UsageError):
    """User code used an engine-managed gradient in a way that would silently be wrong."""

"""What code that torch.fx did not trace does with the model's modules, read from its source.

Where a forward cannot be traced, convfuse traces the parts below it on their own; the untraced
code then decides how those parts are used. A fold inside a part is right only where every use
of the part's modules goes through the part's own forward. This module reads that code (``ast``
on ``inspect.getsource``: the forward and every function it can reach with one of the model's
modules in hand, in every branch, whatever inputs would take) and records each use:

* ``call``: a module called as a whole (``self.a(x)``, ``for m in self.blocks: x = m(x)``), or
  handed whole to code this reader does not follow (another package's function, such as
  ``torch.utils.checkpoint.checkpoint(self.a, x)`` or a profiler);
* ``reach``: a use that sees inside a module: its parameters or buffers read (``self.bn.weight``,
  ``self.conv.bias is None``), nn.Module introspection (``self.a.modules()``, ``.apply``), a module
  stored on another object, an attribute named only at run time through a custom ``__getattr__``;
* ``unreadable``: code that could not be read (no source): anything below its module may be used.

Reading a part root's plain data attributes (``m.f``, ``m.i``, ``m.type`` in ultralytics),
comparing modules, ``isinstance`` and parameter metadata (``next(self.parameters()).device``)
are not uses. The reading is flow-insensitive (every assignment to a name may reach every use),
so it over-approximates: a use it cannot rule out is recorded.
"""

from convfuse.graphs.untraced.reader import Reader
from convfuse.graphs.untraced.uses import CALL, REACH, READ, UNREADABLE, CodeUse, Use, first_reach

__all__ = ["CALL", "REACH", "READ", "UNREADABLE", "CodeUse", "Reader", "Use", "first_reach"]

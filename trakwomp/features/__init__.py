"""Features: projected gradients phi(x) = P^T grad f(x) and q for a batch of examples, from a
gradient engine (per-example gradients then a projector, or factored per-layer projections
from hooks), the memory they need, and the writer that stores them in row chunks."""

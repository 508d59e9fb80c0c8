"""The fold: the table of pairs, the fixed reasons, one table of checks over a pair description,
the weight arithmetic (float64), what a norm computes, and local proofs for overridden forwards."""

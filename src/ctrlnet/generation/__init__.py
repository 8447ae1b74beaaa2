"""The generation path: a request becomes a plan of passes, each sampled and decoded (see README)."""

"""The training stage: one accelerate loop (``forgetkit.train.loop.train``)."""

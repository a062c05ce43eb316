"""A small real training run the API, classify and README tests share: settings for mixem.train (~5 s)."""

# The cpu preset's data probe (1 x 28 px), a narrow trunk, few epochs, every stage.
TINY_RUN = dict(max_images=600, epochs=2, batch_size=64, lr=2e-3, warmup_epochs=0.5, blur=False, width=8)
TINY_RUN |= dict(head_hidden=16, refine_epochs=1, refine_neighbors=5, device="cpu")

"""Devices to meshes (``mesh``: one slice over ICI, or several over DCN) and logical names to shardings
(``shardings``; the names themselves are resolved by ``kaleido_jax.model.sharding``)."""

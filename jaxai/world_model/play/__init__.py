"""Play a trained world model in a browser: ``python -m jaxai.world_model.play`` (``__main__``), the
page's server (``server``) and the page itself (``page.html``)."""

"""The HTTP service (`pip install vlmkit[serve]`): FastAPI routes over the capabilities of loaded models.

`create_app(models, indexes, settings)` builds the app; `vlmkit serve` (serve/cli.py) loads run
folders and runs it with uvicorn. Each model serves only the endpoints its capabilities allow;
requests of one kind that arrive together are batched (serve/batching.py); every limit a
deployment needs lives in `Settings` (serve/settings.py). The core library never imports this
package, so FastAPI stays an optional dependency.
"""

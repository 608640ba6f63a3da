"""The classification service (`iclcls serve`): FastAPI app, the store of additions
(``iclcls.store``) and snapshots,
micro-batching, auth, and a small web page. Import ``iclcls.serve.app`` for the app itself;
this package's import stays light."""

"""The server as a Ray Serve application: many engine replicas, one source of truth for tasks.

`python -m server.fleet` (the `fleet` extra) starts or joins a Ray cluster and serves the same
HTTP API as `python -m server` through Ray Serve's proxy, from N replicas of `create_app`.

- `artifacts`: the shared, content-addressed artifact store (a directory every replica reads,
  or object storage through fsspec: s3://, gs://, ...);
- `catalog`: the task catalog (which versions exist, which is active, which serves /search),
  persisted in the artifact store and held by one Ray actor that replicas long-poll;
- `store_actor`: the embedded vector store owned by one actor, and the replicas' proxy to it
  (two processes never open the embedded store; a Qdrant URL is opened by each replica);
- `registry`: `FleetRegistry`, the registry of one replica: publishes its admin changes to the
  catalog and follows the catalog's changes from every other replica;
- `deployment`: the Ray Serve deployment around `server.app.create_app` (tasks routed to the
  replicas holding them through Ray Serve's model multiplexing);
- `routes`: `GET /fleet/tasks`, every catalog task with its artifacts and where it is held;
- `settings` and `__main__`: the command line.

Ray is imported only by `deployment`, `store_actor`'s actor side and `__main__`; `artifacts`
and `catalog`'s book are plain Python, tested without a cluster.
"""

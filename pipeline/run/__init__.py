"""The run layer every command stands on: options, the session (paths, device, work directory
and its lock, events, report), and execution on Dask, locally, on GPUs or on a cluster."""

"""The StreamV2V Canvas app (see app.py): the page and its transports, the session layer, the service and the renderers.

Transports: layout (the Gradio page and its events), channel (the WebSocket
fast channel), popout (the pop-out view), over the session layer, live.
Below it: service (render, record, export, translate), sessions (admission,
idle release), renderer (the renderer contract), local_renderer (the engine
and its scheduler in this process), ray_renderer (Ray Serve replicas),
scheduler and mailbox (one model thread, newest frame wins).  The map of
every module: docs/architecture.md.
"""

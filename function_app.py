"""Azure Functions app (Python v2 programming model): thin adapters around the ``shared`` engine.

The triggers (Event Grid, alerts, timers, the queue worker) are registered here; no logic lives in
this file.
"""

import azure.functions as func

app = func.FunctionApp()

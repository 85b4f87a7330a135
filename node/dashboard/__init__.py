"""The live dashboard every node serves, and ``mesh-node top``.

Any node shows the whole mesh, and none is special: each keeps a bounded log of its own
events (``events``); a node with a page (or ``top``) open polls every live member's log and
merges them into one feed (``hub``), which the page reads as Server-Sent Events. A node
nobody watches does nothing for the dashboard but append to its ring. Access is by one-time
token, traded for a session cookie, with Host and Origin checked (``access``); the routes are
in ``web``; ``top`` draws the same feed in a terminal.

The page (``static/``: ``index.html``, ``app.js``, ``app.css``) is plain DOM and SVG, with
no front-end library. We looked at what a page like this usually takes (uPlot or Chart.js
for the task stream, htmx or Alpine for updates, a Dask-style Bokeh server) and chose none:

- the task stream is rectangles on a time axis, one lane per slot: a few dozen lines of SVG,
  with a ``<rect>`` per task that a test (and a screen reader) can find by its ``data-*``
  attributes, where a canvas chart would be opaque;
- updates arrive as Server-Sent Events (``EventSource``, reconnecting by itself): the page is
  read-only, so a websocket's upstream half would be unused surface;
- nothing is built, bundled or fetched: a fresh clone (or ``pip install``) serves exactly
  the three files in the package, and there is no vendored code to audit and keep updated.
  The Content-Security-Policy can then be strict (``script-src 'self'``, nothing inline).

Everything from the feed goes into the page as text (``textContent``), never as markup.
"""

from node.dashboard.events import EventLog
from node.dashboard.hub import Hub
from node.dashboard.web import Dashboard

__all__ = ["Dashboard", "EventLog", "Hub"]

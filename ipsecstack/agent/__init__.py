"""The composition root: a configuration in, a running node with its backends, IKE and control out.

Layers, each importing only those below it (``tests/unit/test_import_graph.py`` holds the contract):

- the sans-IO core (``ipsecstack.{config,datapath,sa,spd,xform,wire,ike,...}``): no I/O, no clock;
- ``ipsecstack.runtime``: the asyncio adapters (Node, IKE endpoint, control socket, the engine's punt
  loops) and the I/O protocols (``runtime/io.py``) that backends implement;
- ``backends``: packet I/O, importing only ``runtime.io``, the wire codecs and ``errors``;
- this package, ``cli`` and the demo: the only places that name a backend and a runtime class together.
"""

from ipsecstack.agent.build import build_node, install_traps, local_address, tunnel_routes
from ipsecstack.agent.reload import Reloader
from ipsecstack.agent.services import attach_control, attach_ike, drop_privileges, force_encap

__all__ = [
    "Reloader",
    "attach_control",
    "attach_ike",
    "build_node",
    "drop_privileges",
    "force_encap",
    "install_traps",
    "local_address",
    "tunnel_routes",
]

"""Outputs: the only code that writes files or draws.

Bundles (:mod:`.bundle`), rendering and colour (:mod:`.render`), video (:mod:`.video`) and the HTML report
(:mod:`.report`). Outputs read results of the pipelines and compute; nothing below imports from here.
"""

from camanim.outputs.attach import attach

attach()

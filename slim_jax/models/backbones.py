"""The registry of recommender backbones: rec.backbone's name -> the spec its file declares.

A new backbone is one new file under slim_jax/models/, its `Backbone` module and `BackboneSpec`
(models/backbone.py), plus its entry below: RecConfig and the trainer read all else from the spec.
"""

from slim_jax.models import bert4rec, gru4rec, sasrec, srgnn

BACKBONES = {spec.name: spec for spec in (sasrec.SPEC, gru4rec.SPEC, srgnn.SPEC, bert4rec.SPEC)}

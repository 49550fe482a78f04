"""graft's training side: data, pretrained backbones, two-phase fit, evaluation, export."""

from service.tfenv import quiet_tensorflow

quiet_tensorflow()

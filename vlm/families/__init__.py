"""The families. Importing this package imports every family's classes, so that configs and
checkpoints can name them (``vlm.core.classes``): ``llava`` is the core model itself."""

import vlm.core.llava  # noqa: F401  (family=llava)
import vlm.families.calm.model  # noqa: F401
import vlm.families.dense_connector.model  # noqa: F401
import vlm.families.layer_fusion.model  # noqa: F401
import vlm.families.qformer_captioner.model  # noqa: F401
import vlm.families.qformer_captioner.module  # noqa: F401
import vlm.families.sam_segmentation.model  # noqa: F401
import vlm.families.sam_segmentation.module  # noqa: F401

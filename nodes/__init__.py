"""ComfyUI nodes: thin adapters over ``hypernet``. Imported only inside ComfyUI (they import ``comfy``)."""

from .comfy_bridge import register_model_folders
from .dual_path import SubjectDualPath
from .finetune import RankRelaxedFinetune
from .loaders import LoadCompactSubjectLora, LoadSubjectHyperNet
from .lora_nodes import ApplySubjectLora, SaveSubjectLora
from .predict import PredictSubjectLora
from .prompt import SubjectPromptEncode
from .sampling import HMCFGGuiderNode, HMCFGKSampler
from .tuning import SubjectTuning

register_model_folders()

# Node ids are namespaced so they never collide with core nodes or other packs.
NODE_CLASS_MAPPINGS = {
    "SubjectHyperNet_LoadHyperNet": LoadSubjectHyperNet,
    "SubjectHyperNet_PredictSubjectLora": PredictSubjectLora,
    "SubjectHyperNet_HMCFGKSampler": HMCFGKSampler,
    "SubjectHyperNet_HMCFGGuider": HMCFGGuiderNode,
    "SubjectHyperNet_RankRelaxedFinetune": RankRelaxedFinetune,
    "SubjectHyperNet_SaveSubjectLora": SaveSubjectLora,
    "SubjectHyperNet_LoadCompactSubjectLora": LoadCompactSubjectLora,
    "SubjectHyperNet_ApplySubjectLora": ApplySubjectLora,
    "SubjectHyperNet_SubjectPromptEncode": SubjectPromptEncode,
    "SubjectHyperNet_SubjectTuning": SubjectTuning,
    "SubjectHyperNet_SubjectDualPath": SubjectDualPath,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SubjectHyperNet_LoadHyperNet": "Load HyperNet",
    "SubjectHyperNet_PredictSubjectLora": "Predict Subject LoRA",
    "SubjectHyperNet_HMCFGKSampler": "HM-CFG KSampler",
    "SubjectHyperNet_HMCFGGuider": "HM-CFG Guider",
    "SubjectHyperNet_RankRelaxedFinetune": "Rank-Relaxed Finetune",
    "SubjectHyperNet_SaveSubjectLora": "Save Subject LoRA",
    "SubjectHyperNet_LoadCompactSubjectLora": "Load Subject LoRA (compact)",
    "SubjectHyperNet_ApplySubjectLora": "Apply Subject LoRA",
    "SubjectHyperNet_SubjectPromptEncode": "Subject Prompt Encode",
    "SubjectHyperNet_SubjectTuning": "Subject Tuning (embedding + LoRA)",
    "SubjectHyperNet_SubjectDualPath": "Subject Dual-Path",
}

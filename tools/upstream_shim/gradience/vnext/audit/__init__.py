from .lora_audit import (  # noqa: F401
    LoRAAdapterConfig,
    LoRAAuditResult,
    LoRALayerAudit,
    audit_lora_peft_dir,
    audit_lora_state_dict,
    infer_module_type,
)

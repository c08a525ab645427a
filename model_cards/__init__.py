"""Card templates rendered by hf_trak (installed as ``hf_trak.model_cards``)."""

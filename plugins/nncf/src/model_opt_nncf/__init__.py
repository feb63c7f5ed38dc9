"""model-opt plugin: NNCF calibrated int8 deployed through OpenVINO, and NNCF pruning."""

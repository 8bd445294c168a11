"""The update agent: A/B slots, the OTA state machine, MQTT and telemetry."""

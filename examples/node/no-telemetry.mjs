// onnxruntime-node 1.29 and later, on Linux and macOS, uploads usage events to Microsoft and keeps a
// device id and an event cache under $XDG_CACHE_HOME/Microsoft unless ORT_DISABLE_TELEMETRY is set
// before the runtime starts (microsoft/onnxruntime#27379). Imported ahead of onnxruntime-node, as ES
// modules run in import order; a value already in the environment wins. onnxruntime-web has no telemetry.
process.env.ORT_DISABLE_TELEMETRY ??= "1";

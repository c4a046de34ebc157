{{/* Names and labels shared by every object of the release. */}}
{{- define "lorax.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lorax.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lorax.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorax.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lorax.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lorax.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lorax.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lorax.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The environment variables of the launcher's flags (docs/reference/launcher.md). A `lorax.<key>`
value must name one of them, so that a misspelt key fails instead of being silently ignored by
the launcher. PORT and HUGGINGFACE_HUB_CACHE are left out: the chart sets them.
*/}}
{{- define "lorax.flagEnvNames" -}}
MODEL_ID SOURCE WEIGHTS_CACHE_OVERRIDE ADAPTER_ID ADAPTER_SOURCE DEFAULT_ADAPTER_SOURCE
PRELOADED_ADAPTER_IDS PRELOADED_ADAPTER_SOURCE MERGE_ADAPTER_WEIGHTS PREDIBASE_API_TOKEN REVISION
NUM_SHARD SHARDED QUANTIZE PREFIX_CACHING CHUNKED_PREFILL SPECULATIVE_TOKENS
SPECULATION_MAX_BATCH_SIZE ATTENTION_BACKEND COMPILE EAGER COMPILE_MAX_BATCH_SIZE COMPILE_MAX_RANK
COMPILE_BATCH_SIZE BACKEND DTYPE TRUST_REMOTE_CODE MAX_CONCURRENT_REQUESTS MAX_BEST_OF
MAX_STOP_SEQUENCES MAX_INPUT_LENGTH MAX_TOTAL_TOKENS WAITING_SERVED_RATIO MAX_BATCH_PREFILL_TOKENS
MAX_BATCH_TOTAL_TOKENS MAX_WAITING_TOKENS EAGER_PREFILL DECODE_STEPS_PER_CALL MAX_ACTIVE_ADAPTERS
ADAPTER_CYCLE_TIME_S HEALTH_STALL_TIMEOUT_S HEALTH_PROBE_INTERVAL_S ADAPTER_MEMORY_FRACTION HOSTNAME
SHARD_UDS_PATH MASTER_ADDR MASTER_PORT VALIDATION_WORKERS TOKENIZER_CONFIG_PATH JSON_OUTPUT
OTLP_ENDPOINT CORS_ALLOW_ORIGIN CORS_ALLOW_HEADER CORS_EXPOSE_HEADER CORS_ALLOW_METHOD
CORS_ALLOW_CREDENTIALS WATERMARK_GAMMA WATERMARK_DELTA NGROK NGROK_AUTHTOKEN NGROK_EDGE
DOWNLOAD_ONLY CUDA_MEMORY_FRACTION KV_CACHE_BLOCKS DISABLE_CUSTOM_KERNELS DISABLE_SGMV
MEMORY_WIGGLE_ROOM EMBEDDING_DIM SHARD_STARTUP_TIMEOUT_S
{{- end }}

{{/* Whether a value counts as unset: null, "" or an empty list. */}}
{{- define "lorax.isUnset" -}}
{{- if or (kindIs "invalid" .) (and (kindIs "string" .) (eq . "")) (and (kindIs "slice" .) (empty .)) -}}
true
{{- end -}}
{{- end }}

{{/*
A value as an environment variable's text. Helm reads numbers from values files as floats, which
print as 1e+06: whole numbers are printed as integers. Lists are joined with commas (the launcher
splits CORS_ALLOW_ORIGIN on them).
*/}}
{{- define "lorax.envText" -}}
{{- if kindIs "slice" . -}}
{{- join "," . -}}
{{- else if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end }}

{{/* EnvVar objects for the `lorax` values, sorted by key. */}}
{{- define "lorax.flagEnv" -}}
{{- $known := splitList " " (include "lorax.flagEnvNames" . | replace "\n" " ") }}
{{- range $key := keys .Values.lorax | sortAlpha }}
{{- $value := get $.Values.lorax $key }}
{{- $name := snakecase $key | upper }}
{{- if eq $name "PORT" }}
{{- fail "lorax.port: set containerPort instead (the probes and the Service use it too)" }}
{{- else if eq $name "HUGGINGFACE_HUB_CACHE" }}
{{- fail "lorax.huggingfaceHubCache: set cache.mountPath instead (the cache volume is mounted there)" }}
{{- else if not (has $name $known) }}
{{- fail (printf "lorax.%s is not a launcher flag (no variable %s); see docs/reference/launcher.md, or use launcherEnv for other variables" $key $name) }}
{{- end }}
{{- if not (include "lorax.isUnset" $value) }}
- name: {{ $name }}
  value: {{ include "lorax.envText" $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Seconds the launcher may take to stop after SIGTERM: the router, then the shards, each
SIGKILLed SHUTDOWN_GRACE (10 s, launcher/src/launch.rs) after SIGTERM. */}}
{{- define "lorax.launcherStopSeconds" -}}
20
{{- end }}

{{/* Checks of values against each other, run once by the Deployment. */}}
{{- define "lorax.validate" -}}
{{- if include "lorax.isUnset" .Values.lorax.modelId }}
{{- fail "lorax.modelId is required (a Hugging Face Hub model id or a directory in the container)" }}
{{- end }}
{{- $shards := int (default 1 .Values.lorax.numShard) }}
{{- $gpus := int .Values.gpu.count }}
{{- if and (gt $gpus 0) (lt $gpus $shards) }}
{{- fail (printf "lorax.numShard is %d but gpu.count is %d: each shard needs a GPU of its own" $shards $gpus) }}
{{- end }}
{{- $stop := add (int .Values.preStopSleepSeconds) (int (include "lorax.launcherStopSeconds" .)) }}
{{- if le (int .Values.terminationGracePeriodSeconds) $stop }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds plus the launcher's longest stop (%d s in all), or Kubernetes kills the shards before they stop" (int .Values.terminationGracePeriodSeconds) $stop) }}
{{- end }}
{{- end }}

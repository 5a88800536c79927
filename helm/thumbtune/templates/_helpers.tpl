{{/* Names and labels. */}}
{{- define "thumbtune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "thumbtune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "thumbtune.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "thumbtune.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "thumbtune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "thumbtune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "server"). */}}
{{- define "thumbtune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "thumbtune.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "thumbtune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "thumbtune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "thumbtune.secretName" -}}
{{- default (printf "%s-secrets" (include "thumbtune.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{- define "thumbtune.adapterClaim" -}}
{{- default (printf "%s-adapters" (include "thumbtune.fullname" .)) .Values.adapterStore.existingClaim }}
{{- end }}

{{- define "thumbtune.modelCacheClaim" -}}
{{- default (printf "%s-model-cache" (include "thumbtune.fullname" .)) .Values.modelCache.existingClaim }}
{{- end }}

{{/* image: call with (dict "ctx" $ "image" .Values.server.image). */}}
{{- define "thumbtune.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/*
Settings the chart sets itself (from other values) or keeps in the Secret: refused under settings /
learnerSettings, so that one value cannot say two things.
*/}}
{{- define "thumbtune.validateSettings" -}}
{{- $_ := required "settings.THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS is required: the bootstrap servers of your Kafka, e.g. --set settings.THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS=kafka.kafka.svc:9092 (the chart runs no broker)" .Values.settings.THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS }}
{{- $owned := dict
  "THUMBTUNE_HOST" "it is 0.0.0.0 in the pod"
  "THUMBTUNE_PORT" "set server.port"
  "THUMBTUNE_CACHE_DIR" "set modelCache"
  "THUMBTUNE_SPOOL_DIR" "set server.spool"
  "THUMBTUNE_ADAPTER_STORE" "set adapterStore"
  "THUMBTUNE_API_KEYS" "set secrets.THUMBTUNE_API_KEYS or secrets.existingSecret"
  "THUMBTUNE_ADMIN_TOKEN" "set secrets.THUMBTUNE_ADMIN_TOKEN or secrets.existingSecret"
  "THUMBTUNE_REDIS_URL" "set secrets.THUMBTUNE_REDIS_URL or secrets.existingSecret"
  "THUMBTUNE_KAFKA_SASL_PASSWORD" "set secrets.THUMBTUNE_KAFKA_SASL_PASSWORD or secrets.existingSecret"
  "THUMBTUNE_KAFKA_SSL_PASSWORD" "set secrets.THUMBTUNE_KAFKA_SSL_PASSWORD or secrets.existingSecret"
  "THUMBTUNE_VLLM_API_KEY" "set secrets.THUMBTUNE_VLLM_API_KEY or secrets.existingSecret"
  "THUMBTUNE_KAFKA_SSL_CAFILE" "set kafkaTLS.secret (its ca.crt is mounted and used)"
  "THUMBTUNE_KAFKA_SSL_CERTFILE" "set kafkaTLS.secret and kafkaTLS.clientCertificate"
  "THUMBTUNE_KAFKA_SSL_KEYFILE" "set kafkaTLS.secret and kafkaTLS.clientCertificate"
  "THUMBTUNE_LEARNER_METRICS_HOST" "it is 0.0.0.0 in the pod"
  "THUMBTUNE_LEARNER_METRICS_PORT" "set learner.metricsPort"
}}
{{- range $section := list "settings" "learnerSettings" }}
{{- range $key, $value := index $.Values $section }}
{{- if hasKey $owned $key }}
{{- fail (printf "%s.%s is set by the chart: %s" $section $key (get $owned $key)) }}
{{- end }}
{{- if not (hasPrefix "THUMBTUNE_" $key) }}
{{- fail (printf "%s.%s: settings are THUMBTUNE_* variables (see the README's settings table)" $section $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $key, $_ := .Values.learnerSettings }}
{{- if not (hasPrefix "THUMBTUNE_LEARNER_" $key) }}
{{- fail (printf "learnerSettings.%s: learner settings start with THUMBTUNE_LEARNER_; shared settings go under settings" $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes and mounts every thumbtune pod has: the adapter store, the model cache, /tmp. */}}
{{- define "thumbtune.commonVolumes" -}}
{{- if not .Values.adapterStore.url }}
- name: adapters
  persistentVolumeClaim:
    claimName: {{ include "thumbtune.adapterClaim" . }}
{{- end }}
- name: model-cache
{{- if eq .Values.modelCache.type "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ include "thumbtune.modelCacheClaim" . }}
{{- else if eq .Values.modelCache.type "emptyDir" }}
  emptyDir:
    sizeLimit: {{ .Values.modelCache.sizeLimit }}
{{- else }}
{{- fail (printf "modelCache.type must be emptyDir or persistentVolumeClaim, not %q" .Values.modelCache.type) }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- with .Values.kafkaTLS.secret }}
- name: kafka-tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- end }}

{{/* Environment every thumbtune container has. Call with (dict "ctx" $). */}}
{{- define "thumbtune.commonEnv" -}}
- name: THUMBTUNE_CACHE_DIR
  value: {{ .ctx.Values.modelCache.mountPath | quote }}
- name: THUMBTUNE_ADAPTER_STORE
  value: {{ .ctx.Values.adapterStore.url | default .ctx.Values.adapterStore.mountPath | quote }}
{{- range $name, $value := .ctx.Values.adapterStore.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .ctx.Values.modelCache.mountPath | quote }}
- name: HOME
  value: /tmp
{{- range $key := list "THUMBTUNE_KAFKA_SASL_PASSWORD" "THUMBTUNE_KAFKA_SSL_PASSWORD" "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ include "thumbtune.secretName" $.ctx }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- if .ctx.Values.kafkaTLS.secret }}
- name: THUMBTUNE_KAFKA_SSL_CAFILE
  value: /etc/thumbtune/kafka-tls/ca.crt
{{- if .ctx.Values.kafkaTLS.clientCertificate }}
- name: THUMBTUNE_KAFKA_SSL_CERTFILE
  value: /etc/thumbtune/kafka-tls/tls.crt
- name: THUMBTUNE_KAFKA_SSL_KEYFILE
  value: /etc/thumbtune/kafka-tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/* Call with (dict "ctx" $ "readOnlyAdapters" true|false). */}}
{{- define "thumbtune.commonMounts" -}}
{{- if not .ctx.Values.adapterStore.url }}
- name: adapters
  mountPath: {{ .ctx.Values.adapterStore.mountPath }}
  readOnly: {{ .readOnlyAdapters }}
{{- end }}
- name: model-cache
  mountPath: {{ .ctx.Values.modelCache.mountPath }}
- name: tmp
  mountPath: /tmp
{{- if .ctx.Values.kafkaTLS.secret }}
- name: kafka-tls
  mountPath: /etc/thumbtune/kafka-tls
  readOnly: true
{{- end }}
{{- end }}

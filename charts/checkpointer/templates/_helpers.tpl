{{/*
The chart's name, truncated to 63 characters (a DNS label).
*/}}
{{- define "checkpointer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A fully qualified app name, the prefix of every object name. A release named like the chart
("checkpointer") keeps the plain name.
*/}}
{{- define "checkpointer.fullname" -}}
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

{{- define "checkpointer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels of every object.
*/}}
{{- define "checkpointer.labels" -}}
helm.sh/chart: {{ include "checkpointer.chart" . }}
{{ include "checkpointer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: checkpointer
{{- end }}

{{- define "checkpointer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "checkpointer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels and selector labels of one component: call with (dict "root" $ "component" "agent").
*/}}
{{- define "checkpointer.componentLabels" -}}
{{ include "checkpointer.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "checkpointer.componentSelectorLabels" -}}
{{ include "checkpointer.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "checkpointer.controllerName" -}}
{{- printf "%s-controller" (include "checkpointer.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "checkpointer.agentName" -}}
{{- printf "%s-agent" (include "checkpointer.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "checkpointer.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The name of the chart's storage Secret (in the release namespace), or "" when the storage has
none: no storage, or credentials from the operator's environment.
*/}}
{{- define "checkpointer.storageSecretName" -}}
{{- if .Values.storage.create }}
{{- if .Values.storage.existingSecret }}
{{- .Values.storage.existingSecret }}
{{- else if or .Values.storage.accessKeyID .Values.storage.secretAccessKey }}
{{- printf "%s-storage" (include "checkpointer.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Every storage Secret the operator may read, as YAML: namespace -> sorted list of names.
*/}}
{{- define "checkpointer.storageSecretsByNamespace" -}}
{{- $byNamespace := dict }}
{{- $own := list }}
{{- with include "checkpointer.storageSecretName" . }}
{{- $own = append $own . }}
{{- end }}
{{- if and .Values.storage.create .Values.storage.encryptionSecret }}
{{- $own = append $own .Values.storage.encryptionSecret }}
{{- end }}
{{- if $own }}
{{- $_ := set $byNamespace .Release.Namespace ($own | uniq | sortAlpha) }}
{{- end }}
{{- range .Values.rbac.storageSecrets }}
{{- if not (and .namespace .name) }}
{{- fail "each rbac.storageSecrets entry needs a namespace and a name" }}
{{- end }}
{{- $names := get $byNamespace .namespace | default list }}
{{- $_ := set $byNamespace .namespace (append $names .name | uniq | sortAlpha) }}
{{- end }}
{{- toYaml $byNamespace }}
{{- end }}

{{/*
Values that the schema cannot check on its own; included by every workload template.
*/}}
{{- define "checkpointer.validate" -}}
{{- if not (has .Values.podman.mode (list "api" "cli")) }}
{{- fail (printf "podman.mode must be api or cli, not %q" .Values.podman.mode) }}
{{- end }}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.agent.stateDir)) .Values.agent.spoolDir) }}
{{- fail (printf "agent.spoolDir (%s) must be inside agent.stateDir (%s): only stateDir is mounted from the host" .Values.agent.spoolDir .Values.agent.stateDir) }}
{{- end }}
{{- if and .Values.storage.create (not .Values.storage.bucket) }}
{{- fail "storage.create needs storage.bucket" }}
{{- end }}
{{- if and .Values.storage.create (not .Values.storage.existingSecret) (ne (empty .Values.storage.accessKeyID) (empty .Values.storage.secretAccessKey)) }}
{{- fail "set both storage.accessKeyID and storage.secretAccessKey (or storage.existingSecret)" }}
{{- end }}
{{- end }}

{{/*
The admin namespaces as the JSON list CHECKPOINTER_ADMIN_NAMESPACES takes; empty: the release
namespace alone.
*/}}
{{- define "checkpointer.adminNamespaces" -}}
{{- default (list .Release.Namespace) .Values.tenancy.adminNamespaces | toJson }}
{{- end }}

{{/*
The /metrics port of one component: its own metricsPort, else metrics.port. Call with
(dict "root" $ "component" "agent").
*/}}
{{- define "checkpointer.metricsPort" -}}
{{- (index .root.Values .component).metricsPort | default .root.Values.metrics.port | int64 }}
{{- end }}

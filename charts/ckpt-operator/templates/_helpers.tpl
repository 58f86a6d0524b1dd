{{/* The chart name, truncated to 63 characters (a label value). */}}
{{- define "ckpt-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource name prefix: fullnameOverride, else RELEASE-NAME, or RELEASE when the
release name already contains the chart name. At most 63 characters.
*/}}
{{- define "ckpt-operator.fullname" -}}
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

{{/* name-version for the helm.sh/chart label. */}}
{{- define "ckpt-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource of the release. */}}
{{- define "ckpt-operator.labels" -}}
helm.sh/chart: {{ include "ckpt-operator.chart" . }}
{{ include "ckpt-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ckpt
{{- end }}

{{/* Labels that select the operator pods. */}}
{{- define "ckpt-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ckpt-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "ckpt-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ckpt-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The converter pods' ServiceAccount ("" when pods use their namespace's default). */}}
{{- define "ckpt-operator.converterServiceAccountName" -}}
{{- if .Values.converter.serviceAccount.create }}
{{- default (printf "%s-converter" (include "ckpt-operator.fullname" . | trunc 53 | trimSuffix "-")) .Values.converter.serviceAccount.name }}
{{- else }}
{{- .Values.converter.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The namespaces the operator watches, one per line: watchNamespaces, or the release
namespace. Empty with clusterWide (all namespaces). The deprecated single-namespace
key watchNamespace of chart 0.1 is read as watchNamespaces: [it].
*/}}
{{- define "ckpt-operator.watchedNamespaces" -}}
{{- $listed := .Values.watchNamespaces }}
{{- with .Values.watchNamespace }}
{{- if $listed }}
{{- fail "watchNamespace (deprecated) and watchNamespaces are both set: list every namespace in watchNamespaces" }}
{{- end }}
{{- $listed = list . }}
{{- end }}
{{- if .Values.clusterWide }}
{{- if $listed }}
{{- fail "clusterWide watches every namespace: leave watchNamespaces empty" }}
{{- end }}
{{- else if $listed }}
{{- range $listed }}
{{ . }}
{{- end }}
{{- else }}
{{ .Release.Namespace }}
{{- end }}
{{- end }}

{{/* The namespaces the converter ServiceAccount is created in, one per line. */}}
{{- define "ckpt-operator.converterNamespaces" -}}
{{- if .Values.converter.serviceAccount.namespaces }}
{{- range .Values.converter.serviceAccount.namespaces }}
{{ . }}
{{- end }}
{{- else if .Values.clusterWide }}
{{ .Release.Namespace }}
{{- else }}
{{ include "ckpt-operator.watchedNamespaces" . }}
{{- end }}
{{- end }}

{{/* image:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "ckpt-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "ckpt-operator.converterImage" -}}
{{- printf "%s:%s" .Values.converter.image.repository (default .Chart.AppVersion .Values.converter.image.tag) }}
{{- end }}

{{/*
Labels and annotations of the CRD, on lines of their own after `metadata.name`.
sync-crds.sh puts the one include of this into the CRD template; everything else in
that template is crds/checkpointconversions.ckpt.dev.yaml verbatim.
*/}}
{{- define "ckpt-operator.crdMetadata" -}}
labels:
  {{- include "ckpt-operator.labels" . | nindent 2 }}
{{- if .Values.crds.keep }}
annotations:
  helm.sh/resource-policy: keep
{{- end }}
{{- end }}

{{/*
The rules of the operator's Roles (or ClusterRole): exactly the calls in operator/src
(controller.rs, claim.rs, the kube runtime's watcher and event recorder). Keep in sync
with the expected rules in operator/tests/cluster/chart.rs.
*/}}
{{- define "ckpt-operator.rules" -}}
# Watch resources (Controller::new), and read each afresh before deciding (and the
# owner of a claimed target); add and remove the finalizer of a run split across
# pods (its shared staging directory is removed before the resource goes).
- apiGroups: ["ckpt.dev"]
  resources: ["checkpointconversions"]
  verbs: ["get", "list", "watch", "patch"]
# Server-side apply of status (patch_status).
- apiGroups: ["ckpt.dev"]
  resources: ["checkpointconversions/status"]
  verbs: ["patch"]
# The Job's owner reference sets blockOwnerDeletion, which the
# OwnerReferencesPermissionEnforcement admission plugin allows only to who may
# update the owner's finalizers.
- apiGroups: ["ckpt.dev"]
  resources: ["checkpointconversions/finalizers"]
  verbs: ["update"]
# Owned Jobs: watched (Controller::owns), listed per resource, created per run;
# a deleted split run's Jobs deleted, and its cleanup Job read.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
# The Jobs' pods: watched and listed for exit codes, termination messages and why
# a pod waits.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# The Jobs' events: why a Job has no pod (FailedCreate: a missing ServiceAccount,
# a quota).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["list", "watch"]
# Preflight: do the claims exist?
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# Target claim records, one Lease per claim (claim.rs). Each holder is an owner
# reference of the record; the OwnerReferencesPermissionEnforcement admission plugin
# lets only who may delete an object change its owner references.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "update", "delete"]
# Events on every transition (kube::runtime::events::Recorder creates, then patches series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

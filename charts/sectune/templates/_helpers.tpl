{{- define "sectune.fullname" -}}
{{- if .Values.fullnameOverride -}}{{ .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sectune.labels" -}}
app.kubernetes.io/name: sectune-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sectune.selectorLabels" -}}
app.kubernetes.io/name: sectune-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sectune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "sectune.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{/* "true" when the Prometheus Operator's resources should be rendered: the value, or (auto)
whether the cluster serves monitoring.coreos.com/v1. */}}
{{- define "sectune.monitoringCRDs" -}}
{{- $want := .Values.monitoring.prometheusOperator -}}
{{- if eq (toString $want) "auto" -}}
{{- .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}
{{- else -}}
{{- $want -}}
{{- end -}}
{{- end -}}

{{- define "sectune.monitoringLabels" -}}
{{- include "sectune.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* What the operator does in a namespace it watches (a ClusterRole's rules in cluster-wide
mode, a Role's in each watched namespace otherwise). */}}
{{- define "sectune.namespacedRules" -}}
# The custom resources and their status.
- apiGroups: ["sectune.io"]
  resources: ["finetunejobs", "adapterdeployments", "finetuneschedules"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["sectune.io"]
  resources: ["finetunejobs/status", "adapterdeployments/status", "finetuneschedules/status"]
  verbs: ["get", "patch", "update"]
# FineTuneSchedule runs: created from the template, deleted past the history limits.
- apiGroups: ["sectune.io"]
  resources: ["finetunejobs"]
  verbs: ["create", "delete"]
# Children of a FineTuneJob: the training Job, its ConfigMap and (multi-node) rendezvous
# Service. Children of an AdapterDeployment: the server Deployment (replaced when its rendering
# changes), the ServingConfig ConfigMap, the Service and a PodDisruptionBudget (deleted when
# replicas drop to one). Deletion of the rest is left to owner references.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "update"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "delete"]
{{- if .Values.networkPolicies.enabled }}
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create"]
{{- end }}
# Pods are only read: phase, termination message, the address of their metrics.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Secrets are only read by name: to check that referenced ones exist, and the storage keys for
# deleting artifacts of jobs with cleanupPolicy: Delete. Never listed.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/* Cluster-scoped reads kopf needs in either mode. */}}
{{- define "sectune.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- if not .Values.watchNamespaces }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
{{- end }}
{{- end -}}

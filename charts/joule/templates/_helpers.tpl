{{/* The release's name for its objects, at most 63 characters. */}}
{{- define "joule.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "joule.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "joule.labels" -}}
{{ include "joule.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "joule.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "joule.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "joule.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* What the operator does to the objects it manages, in a namespace it watches. */}}
{{- define "joule.namespacedRules" -}}
- apiGroups: [joule.dev]
  resources: [trainingjobs]
  verbs: [get, list, watch, delete]
- apiGroups: [joule.dev]
  resources: [trainingjobs/status]
  verbs: [get, update, patch]
# Owner references with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is on.
- apiGroups: [joule.dev]
  resources: [trainingjobs/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete, patch]
# The job's headless Service and its TensorBoard's (created once; owned by the job, so
# collected with it; a TensorBoard turned off is deleted).
- apiGroups: [""]
  resources: [services]
  verbs: [create, delete]
# spec.tensorboard's Deployment (owned by the job).
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, delete]
# jobNetworkPolicy: one NetworkPolicy per job (owned by it).
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create]
# The per-job energy bookkeeping (one ConfigMap per job, owned by it).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, update]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/* Cluster-wide reads the scaling policy needs whatever it watches: nodes' GPUs, and the GPU
requests of every pod (the cluster's free GPUs). */}}
{{- define "joule.clusterReadRules" -}}
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# kopf discovers the TrainingJob resource, and notices it appear or go, through the CRDs.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end -}}

{{- define "joule.agentSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{- define "joule.agentLabels" -}}
{{ include "joule.agentSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

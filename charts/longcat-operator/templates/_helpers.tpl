{{/* The release's full name, cut to the 63 characters a name may have. */}}
{{- define "longcat-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "longcat-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "longcat-operator.labels" -}}
{{ include "longcat-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "longcat-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "longcat-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the operator watches when not cluster-wide: the release namespace first, no repeats. */}}
{{- define "longcat-operator.namespaces" -}}
{{- prepend .Values.watch.namespaces .Release.Namespace | uniq | toJson -}}
{{- end -}}

{{- define "longcat-operator.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "longcat-operator.fullname" .) -}}
{{- end -}}

{{/* cert-manager issues the webhook's certificate when asked to and its API is installed. */}}
{{- define "longcat-operator.useCertManager" -}}
{{- if and .Values.webhook.certManager.enabled (.Capabilities.APIVersions.Has "cert-manager.io/v1") -}}true{{- end -}}
{{- end -}}

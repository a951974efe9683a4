{{/* Common names and labels. */}}
{{- define "ct.name" -}}cluster-tunnel{{- end -}}
{{- define "ct.tag" -}}{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}
{{- define "ct.image" -}}{{ .root.Values.image.registry }}/{{ .repo }}:{{ include "ct.tag" .root }}{{- end -}}
{{- define "ct.labels" -}}
app.kubernetes.io/name: {{ include "ct.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "ct.tag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "ct.selector" -}}
app.kubernetes.io/name: {{ include "ct.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}
{{/* DNS name of the client Service, which sidecars and the manager dial. */}}
{{- define "ct.clientHost" -}}{{ .Release.Name }}-server.{{ .Release.Namespace }}.svc{{- end -}}
{{/* Restricted pod security for every container. */}}
{{- define "ct.containerSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* The webhook's matchConditions: the pod opts in as the injector reads it
(annotation cluster-tunnel.io/inject "true", any case, spaces trimmed). The
manager renders the same expression (hub.rs, OPT_IN_CONDITION). */}}
{{- define "ct.injectOptIn" -}}
has(object.metadata.annotations) && 'cluster-tunnel.io/inject' in object.metadata.annotations && object.metadata.annotations['cluster-tunnel.io/inject'].trim().lowerAscii() == 'true'
{{- end -}}

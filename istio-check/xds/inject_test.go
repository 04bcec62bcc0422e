package xds

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	meshconfig "istio.io/istio/pkg/config/mesh"
	"istio.io/istio/pkg/kube/inject"
)

// injector is Istio's sidecar injector of the pinned release as its Helm chart configures it by
// default: the chart's injection template (`manifests/charts/istio-control/istio-discovery/files/
// injection-template.yaml`) and the values the chart hands it (`global`, `sidecarInjectorWebhook`,
// `revision`, and `pilot` with `cni` and `env`, from the chart's defaults, as
// `templates/istiod-injector-configmap.yaml` picks them), read from the module of the pin.
func injector(t *testing.T) (inject.Templates, inject.ValuesConfig) {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/istio").Output()
	if err != nil {
		t.Fatalf("go list -m istio.io/istio: %v", err)
	}
	chart := filepath.Join(strings.TrimSpace(string(out)), "manifests", "charts", "istio-control", "istio-discovery")
	tmpl, err := os.ReadFile(filepath.Join(chart, "files", "injection-template.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	templates, err := inject.ParseTemplates(inject.RawTemplates{inject.SidecarTemplateName: string(tmpl)})
	if err != nil {
		t.Fatalf("Istio's injection template: %v", err)
	}
	var chartValues map[string]any
	text, err := os.ReadFile(filepath.Join(chart, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(text, &chartValues); err != nil {
		t.Fatal(err)
	}
	defaults, _ := chartValues["_internal_defaults_do_not_set"].(map[string]any)
	values := map[string]any{"pilot": map[string]any{"cni": defaults["cni"], "env": defaults["env"]}}
	for _, k := range []string{"global", "sidecarInjectorWebhook", "revision"} {
		if v, ok := defaults[k]; ok {
			values[k] = v
		}
	}
	raw, err := json.Marshal(values)
	if err != nil {
		t.Fatal(err)
	}
	vc, err := inject.NewValuesConfig(string(raw))
	if err != nil {
		t.Fatalf("the chart's injector values: %v", err)
	}
	return templates, vc
}

// The gateway's mesh workload certificate (issue 11) as Istio's own injector makes it: the
// gateway Deployment of every zone overlay, injected as istiod's webhook would (`kube-inject`,
// run for real), gets an istio-proxy whose agent writes its certificate (`OUTPUT_CERTS`) into the
// volume the gateway reads `mesh:` from, mounted in both containers; Istio's traffic capture of
// the pod takes no inbound port and no outbound range (the gateway's own traffic never passes
// through the proxy); the gateway's probes stay its own.
func TestTheGatewayPodGetsItsMeshCertificateFromIstiosInjector(t *testing.T) {
	templates, values := injector(t)
	for _, o := range overlays(t) {
		t.Run(o.zone, func(t *testing.T) {
			var deploy object
			var gatewayConfig string
			for _, obj := range o.all {
				switch {
				case str(obj, "kind") == "Deployment" && str(obj, "metadata", "name") == "keyway-gateway":
					deploy = obj
				case str(obj, "kind") == "ConfigMap" && strings.HasPrefix(str(obj, "metadata", "name"), "keyway-gateway-config"):
					gatewayConfig = str(obj, "data", "gateway.yaml")
				}
			}
			if deploy == nil || gatewayConfig == "" {
				t.Fatalf("no gateway Deployment or configuration rendered")
			}
			var cfg struct {
				Mesh struct{ CA, Cert, Key string } `json:"mesh"`
			}
			if err := yaml.Unmarshal([]byte(gatewayConfig), &cfg); err != nil {
				t.Fatal(err)
			}
			meshDir := filepath.Dir(cfg.Mesh.Cert)
			if filepath.Dir(cfg.Mesh.CA) != meshDir || filepath.Dir(cfg.Mesh.Key) != meshDir ||
				filepath.Base(cfg.Mesh.CA) != "root-cert.pem" || filepath.Base(cfg.Mesh.Cert) != "cert-chain.pem" || filepath.Base(cfg.Mesh.Key) != "key.pem" {
				t.Fatalf("gateway mesh: %+v: not the three files istio-agent writes (root-cert.pem, cert-chain.pem, key.pem) in one directory", cfg.Mesh)
			}

			in := yamlText(t, []object{deploy})
			var injected bytes.Buffer
			var warnings []string
			if err := inject.IntoResourceFile(nil, templates, values, "", meshconfig.DefaultMeshConfig(), strings.NewReader(in), &injected,
				func(s string) { warnings = append(warnings, s) }); err != nil {
				t.Fatalf("Istio's injector refuses the gateway Deployment: %v", err)
			}
			docs := documents(t, "injected", injected.Bytes())
			if len(docs) != 1 {
				t.Fatalf("injection gave %d documents", len(docs))
			}
			spec := get(docs[0], "spec", "template", "spec")
			containers := append(list(spec, "initContainers"), list(spec, "containers")...)
			find := func(name string) any {
				for _, c := range containers {
					if str(c, "name") == name {
						return c
					}
				}
				return nil
			}
			proxy, gw, init := find("istio-proxy"), find("gateway"), find("istio-init")
			if proxy == nil || gw == nil {
				t.Fatalf("after injection: istio-proxy %v, gateway %v (warnings %v)", proxy != nil, gw != nil, warnings)
			}
			env := map[string]string{}
			for _, e := range list(proxy, "env") {
				env[str(e, "name")] = str(e, "value")
			}
			if env["OUTPUT_CERTS"] != meshDir {
				t.Errorf("istio-proxy's OUTPUT_CERTS is %q, the gateway reads its mesh certificate from %s", env["OUTPUT_CERTS"], meshDir)
			}
			mountedAt := func(c any, dir string) string {
				for _, m := range list(c, "volumeMounts") {
					if str(m, "mountPath") == dir {
						return str(m, "name")
					}
				}
				return ""
			}
			pv, gv := mountedAt(proxy, meshDir), mountedAt(gw, meshDir)
			if pv == "" || pv != gv {
				t.Errorf("%s: istio-proxy mounts volume %q there, the gateway %q: the agent's files must reach the gateway", meshDir, pv, gv)
			}
			// Every mount of every container names a volume of the pod (the API server would refuse
			// the pod otherwise).
			known := map[string]bool{}
			for _, v := range list(spec, "volumes") {
				known[str(v, "name")] = true
			}
			for _, c := range containers {
				for _, m := range list(c, "volumeMounts") {
					if !known[str(m, "name")] {
						t.Errorf("container %s mounts %q at %s, which is no volume of the pod", str(c, "name"), str(m, "name"), str(m, "mountPath"))
					}
				}
			}
			volumes := 0
			for _, v := range list(spec, "volumes") {
				if str(v, "name") == pv {
					volumes++
					if str(v, "emptyDir", "medium") != "Memory" {
						t.Errorf("volume %s is not an in-memory emptyDir: the key would be written to the node's disk", pv)
					}
				}
			}
			if volumes != 1 {
				t.Errorf("the pod has %d volumes named %q after injection, want 1", volumes, pv)
			}
			// Istio's capture: with istio-init, its arguments; with istio-cni, the same annotations
			// the CNI plugin reads (`-b` inbound ports, `-i` outbound ranges).
			if init != nil {
				args := list(init, "args")
				for _, flag := range []string{"-b", "-i"} {
					for i, a := range args {
						if a == flag && (i+1 >= len(args) || args[i+1] != "") {
							t.Errorf("istio-init %s %v: the gateway's traffic would be captured", flag, args[i+1:])
						}
					}
				}
			}
			notes := get(docs[0], "spec", "template", "metadata", "annotations")
			for _, k := range []string{"traffic.sidecar.istio.io/includeInboundPorts", "traffic.sidecar.istio.io/includeOutboundIPRanges"} {
				if v, ok := notes.(map[string]any)[k]; !ok || v != "" {
					t.Errorf("after injection %s is %v, want \"\" (nothing captured)", k, v)
				}
			}
			if p := str(gw, "readinessProbe", "httpGet", "path"); p != "/readyz" {
				t.Errorf("the gateway's readiness probe was rewritten (path %q)", p)
			}
			t.Logf("istio-proxy injected (%d containers, init %v), OUTPUT_CERTS %s on volume %s shared with the gateway", len(containers), init != nil, env["OUTPUT_CERTS"], pv)
		})
	}
}

// Every enforced workload of samples/shop, injected by Istio's own injector: Istio's capture
// leaves the keyway inbound port to keyway's listener (istio-init's excluded inbound ports include
// 15181, from the pod's excludeInboundPorts annotation), and keyway's init container that refuses
// UDP, SCTP and ICMP is still there beside istio-init, with what it needs (NET_ADMIN, NET_RAW).
// The pod's keyway agent survives injection untouched (its name is none the injector merges), and
// istio-proxy's agent writes the pod's mesh certificate (`OUTPUT_CERTS`) into the volume the
// keyway agent reads it from, mounted in both; every mount names a volume of the pod.
func TestEnforcedSamplePodsKeepKeywaysPortsAndRulesThroughIstiosInjector(t *testing.T) {
	templates, values := injector(t)
	deployments := readDocuments(t, filepath.Join(repoRoot(t), "samples", "shop", "workloads.yaml"))
	n := 0
	for _, d := range deployments {
		if str(d, "kind") != "Deployment" || str(d, "spec", "template", "metadata", "labels", enforceKey) != "true" {
			continue
		}
		n++
		name := str(d, "metadata", "namespace") + "/" + str(d, "metadata", "name")
		var injected bytes.Buffer
		if err := inject.IntoResourceFile(nil, templates, values, "", meshconfig.DefaultMeshConfig(),
			strings.NewReader(yamlText(t, []object{d})), &injected, func(string) {}); err != nil {
			t.Errorf("%s: Istio's injector refuses it: %v", name, err)
			continue
		}
		docs := documents(t, name, injected.Bytes())
		spec := get(docs[0], "spec", "template", "spec")
		var istioInit, keyway any
		for _, c := range list(spec, "initContainers") {
			switch str(c, "name") {
			case "istio-init":
				istioInit = c
			case "keyway-refuse-non-tcp":
				keyway = c
			}
		}
		if istioInit == nil || keyway == nil {
			t.Errorf("%s: after injection istio-init %v, keyway-refuse-non-tcp %v", name, istioInit != nil, keyway != nil)
			continue
		}
		args := list(istioInit, "args")
		excluded := ""
		for i, a := range args {
			if a == "-d" && i+1 < len(args) {
				excluded, _ = args[i+1].(string)
			}
		}
		if !contains(strings.Split(excluded, ","), fmt.Sprint(inboundPort)) {
			t.Errorf("%s: istio-init excludes inbound ports %q: Istio would capture the keyway inbound port %d", name, excluded, inboundPort)
		}
		caps := list(keyway, "securityContext", "capabilities", "add")
		if len(caps) != 2 || caps[0] != "NET_ADMIN" || caps[1] != "NET_RAW" {
			t.Errorf("%s: keyway-refuse-non-tcp has capabilities %v after injection", name, caps)
		}
		checkPodAgent(t, name, d, spec)
	}
	if n < 8 {
		t.Errorf("only %d enforced Deployments in samples/shop", n)
	}
	t.Logf("%d enforced Deployments of samples/shop injected: 15181 left to keyway, keyway's init container kept", n)
}

// checkPodAgent: after injection the pod still has keyway-agent-config and keyway-agent exactly as
// written, istio-proxy writes OUTPUT_CERTS into the volume keyway-agent reads the mesh certificate
// from (one in-memory emptyDir), and every mount of every container names a volume of the pod.
func checkPodAgent(t *testing.T, name string, before object, spec any) {
	t.Helper()
	const meshDir = "/etc/istio-output-certs"
	find := func(s any, field, container string) any {
		for _, c := range list(s, field) {
			if str(c, "name") == container {
				return c
			}
		}
		return nil
	}
	// A container as JSON, without the empty `resources: {}` the injector's round trip through
	// the Kubernetes types adds.
	normal := func(c any) string {
		m, _ := c.(map[string]any)
		out := map[string]any{}
		for k, v := range m {
			if r, ok := v.(map[string]any); k == "resources" && ok && len(r) == 0 {
				continue
			}
			out[k] = v
		}
		text, _ := json.Marshal(out)
		return string(text)
	}
	was := get(before, "spec", "template", "spec")
	for _, c := range []struct{ field, name string }{{"initContainers", "keyway-agent-config"}, {"containers", "keyway-agent"}} {
		want, got := normal(find(was, c.field, c.name)), normal(find(spec, c.field, c.name))
		if find(was, c.field, c.name) == nil || want != got {
			t.Errorf("%s: %s %s changed by injection:\n%s\nwas\n%s", name, c.field, c.name, got, want)
		}
	}
	proxy := find(spec, "containers", "istio-proxy")
	if proxy == nil {
		proxy = find(spec, "initContainers", "istio-proxy") // native sidecar
	}
	agent := find(spec, "containers", "keyway-agent")
	if proxy == nil || agent == nil {
		t.Errorf("%s: after injection istio-proxy %v, keyway-agent %v", name, proxy != nil, agent != nil)
		return
	}
	outputCerts := ""
	for _, e := range list(proxy, "env") {
		if str(e, "name") == "OUTPUT_CERTS" {
			outputCerts = str(e, "value")
		}
	}
	if outputCerts != meshDir {
		t.Errorf("%s: istio-proxy's OUTPUT_CERTS is %q, the keyway agent reads the mesh certificate from %s", name, outputCerts, meshDir)
	}
	mountedAt := func(c any) string {
		for _, m := range list(c, "volumeMounts") {
			if str(m, "mountPath") == meshDir {
				return str(m, "name")
			}
		}
		return ""
	}
	if pv, av := mountedAt(proxy), mountedAt(agent); pv == "" || pv != av {
		t.Errorf("%s: %s: istio-proxy mounts volume %q there, keyway-agent %q", name, meshDir, pv, av)
	}
	known := map[string]int{}
	for _, v := range list(spec, "volumes") {
		known[str(v, "name")]++
		if str(v, "name") == mountedAt(agent) && str(v, "emptyDir", "medium") != "Memory" {
			t.Errorf("%s: volume %s is not an in-memory emptyDir: the key would be written to the node's disk", name, mountedAt(agent))
		}
	}
	if known[mountedAt(agent)] != 1 {
		t.Errorf("%s: %d volumes named %q after injection, want 1", name, known[mountedAt(agent)], mountedAt(agent))
	}
	for _, c := range append(list(spec, "initContainers"), list(spec, "containers")...) {
		for _, m := range list(c, "volumeMounts") {
			if known[str(m, "name")] == 0 {
				t.Errorf("%s: container %s mounts %q, which is no volume of the pod", name, str(c, "name"), str(m, "name"))
			}
		}
	}
}

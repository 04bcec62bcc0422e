package xds

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// The sample application's fixture. samples/shop has Deployments and one Service (catalog); the
// harness gives every Deployment one Pod and, where samples/shop has none, a Service of the same
// name over its container ports (Istio's protocol by port name: http, grpc, https; postgres and
// redis declared `appProtocol: tcp`, so they are plain TCP Services with their own VIP listener).
// Pod addresses come from podCIDR, Service VIPs from serviceCIDR: neither overlaps the overlay
// prefix. Workloads are enforced (label keyway.io/enforce: "true", as samples/shop has it) except
// those in notEnforced, whose label the harness removes.
const (
	podCIDR     = "10.244.0."
	serviceCIDR = "10.96.0."
	enforceKey  = "keyway.io/enforce"
)

// notEnforced: the workloads left without the enforce label (their sidecars must be exactly
// what Istio generates without keyway).
var notEnforced = map[string]bool{"ops/prometheus": true}

// tcpPorts: Service ports declared plain TCP.
var tcpPorts = map[string]bool{"sql": true, "redis": true}

type object = map[string]any

// pod is one workload's sidecar.
type pod struct {
	name, namespace, ip, serviceAccount string
	labels, annotations                 map[string]string
	enforced                            bool
}

func (p pod) key() string { return p.namespace + "/" + p.name }

// service is a mesh Service with its VIP.
type service struct {
	name, namespace, vip string
	ports                []servicePort
	overlayIPs           []string
}

type servicePort struct {
	name     string
	port     int
	protocol string // "http", "tcp" (for the simulation)
}

// mesh is the sample application as Kubernetes objects.
type mesh struct {
	pods     []pod
	services []service
	objects  []object
}

// repoRoot is the repository's root (this package lives in istio-check/xds).
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "istio", "base", "kustomization.yaml")); err != nil {
		t.Fatalf("repository root not found from %s: %v", dir, err)
	}
	return dir
}

// documents splits a multi-document YAML text into objects.
func documents(t *testing.T, what string, text []byte) []object {
	t.Helper()
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(text)))
	var out []object
	for {
		doc, err := r.Read()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		var o object
		if err := yaml.Unmarshal(doc, &o); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if len(o) > 0 {
			out = append(out, o)
		}
	}
}

func readDocuments(t *testing.T, path string) []object {
	t.Helper()
	text, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return documents(t, path, text)
}

func str(o any, path ...string) string {
	for _, p := range path {
		m, ok := o.(map[string]any)
		if !ok {
			return ""
		}
		o = m[p]
	}
	s, _ := o.(string)
	return s
}

func get(o any, path ...string) any {
	for _, p := range path {
		m, ok := o.(map[string]any)
		if !ok {
			return nil
		}
		o = m[p]
	}
	return o
}

func list(o any, path ...string) []any {
	l, _ := get(o, path...).([]any)
	return l
}

func stringMap(o any) map[string]string {
	out := map[string]string{}
	if m, ok := o.(map[string]any); ok {
		for k, v := range m {
			out[k] = fmt.Sprint(v)
		}
	}
	return out
}

func intOf(v any) int {
	switch n := v.(type) {
	case float64:
		return int(n)
	case int64:
		return int(n)
	case int:
		return n
	}
	return 0
}

// loadShop builds the fixture from samples/shop, the workloads of notEnforced without the
// enforce label.
func loadShop(t *testing.T) *mesh {
	t.Helper()
	return loadShopExcept(t, notEnforced)
}

// loadShopExcept builds the fixture from samples/shop, the workloads of except without the
// enforce label (none: every workload as samples/shop has it).
func loadShopExcept(t *testing.T, except map[string]bool) *mesh {
	t.Helper()
	dir := filepath.Join(repoRoot(t), "samples", "shop")
	m := &mesh{}
	for _, ns := range readDocuments(t, filepath.Join(dir, "namespaces.yaml")) {
		m.objects = append(m.objects, ns)
	}
	declared := map[string]object{}
	for _, s := range readDocuments(t, filepath.Join(dir, "services.yaml")) {
		declared[str(s, "metadata", "namespace")+"/"+str(s, "metadata", "name")] = s
	}
	deployments := readDocuments(t, filepath.Join(dir, "workloads.yaml"))
	for i, d := range deployments {
		if str(d, "kind") != "Deployment" {
			continue
		}
		name, ns := str(d, "metadata", "name"), str(d, "metadata", "namespace")
		tmpl := get(d, "spec", "template")
		labels := stringMap(get(tmpl, "metadata", "labels"))
		enforced := !except[ns+"/"+name]
		if enforced {
			labels[enforceKey] = "true"
		} else {
			delete(labels, enforceKey)
		}
		sa := str(tmpl, "spec", "serviceAccountName")
		if sa == "" {
			sa = "default"
		}
		p := pod{
			name: name + "-0", namespace: ns, ip: fmt.Sprintf("%s%d", podCIDR, 10+i), serviceAccount: sa,
			labels: labels, annotations: stringMap(get(tmpl, "metadata", "annotations")), enforced: enforced,
		}
		m.pods = append(m.pods, p)
		var containerPorts []any
		for _, c := range list(tmpl, "spec", "containers") {
			containerPorts = append(containerPorts, list(c, "ports")...)
		}
		m.objects = append(m.objects, podObject(p, tmpl))
		m.objects = append(m.objects, endpointSlice(p, labels["app"], containerPorts))
		if labels["app"] != name {
			continue // a second Deployment of one app (catalog-c): the app's Service covers it
		}
		svc, ok := declared[ns+"/"+name]
		if !ok {
			svc = serviceObject(name, ns, labels["app"], containerPorts)
		}
		m.addService(svc, containerPorts)
	}
	return m
}

func podObject(p pod, tmpl any) object {
	spec := get(tmpl, "spec").(map[string]any)
	return object{
		"apiVersion": "v1", "kind": "Pod",
		"metadata": object{"name": p.name, "namespace": p.namespace, "labels": p.labels, "annotations": p.annotations},
		"spec":     object{"serviceAccountName": p.serviceAccount, "nodeName": "node-1", "containers": spec["containers"]},
		"status": object{
			"phase": "Running", "podIP": p.ip, "podIPs": []any{object{"ip": p.ip}},
			"conditions": []any{object{"type": "Ready", "status": "True"}},
		},
	}
}

func serviceObject(name, ns, app string, containerPorts []any) object {
	var ports []any
	for _, cp := range containerPorts {
		portName := str(cp, "name")
		if portName == "metrics" {
			continue // scraped by pod address, not a Service port
		}
		sp := object{"name": portName, "port": intOf(get(cp, "containerPort")), "targetPort": portName}
		if tcpPorts[portName] {
			sp["appProtocol"] = "tcp"
		}
		ports = append(ports, sp)
	}
	return object{
		"apiVersion": "v1", "kind": "Service",
		"metadata": object{"name": name, "namespace": ns},
		"spec":     object{"selector": object{"app": app}, "ports": ports},
	}
}

func endpointSlice(p pod, app string, containerPorts []any) object {
	var ports []any
	for _, cp := range containerPorts {
		port := object{"name": str(cp, "name"), "port": intOf(get(cp, "containerPort")), "protocol": "TCP"}
		if tcpPorts[str(cp, "name")] {
			port["appProtocol"] = "tcp"
		}
		ports = append(ports, port)
	}
	return object{
		"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
		"metadata": object{
			"name": p.name, "namespace": p.namespace,
			"labels": object{"kubernetes.io/service-name": app},
		},
		"endpoints": []any{object{
			"addresses": []any{p.ip}, "conditions": object{"ready": true},
			"targetRef": object{"kind": "Pod", "name": p.name, "namespace": p.namespace},
		}},
		"ports": ports,
	}
}

// addService gives a Service object its VIP and records it.
func (m *mesh) addService(svc object, containerPorts []any) {
	s := service{
		name: str(svc, "metadata", "name"), namespace: str(svc, "metadata", "namespace"),
		vip: fmt.Sprintf("%s%d", serviceCIDR, 10+len(m.services)),
	}
	if ips := str(svc, "metadata", "annotations", "keyway.io/overlay-ips"); ips != "" {
		s.overlayIPs = strings.Split(ips, ",")
	}
	spec := get(svc, "spec").(map[string]any)
	spec["clusterIP"] = s.vip
	for _, sp := range list(svc, "spec", "ports") {
		name := str(sp, "name")
		proto := "http"
		if tcpPorts[name] || str(sp, "appProtocol") == "tcp" || strings.HasPrefix(name, "https") {
			proto = "tcp"
		}
		s.ports = append(s.ports, servicePort{name: name, port: intOf(get(sp, "port")), protocol: proto})
	}
	m.services = append(m.services, s)
	m.objects = append(m.objects, svc)
}

// yamlText joins objects into one multi-document YAML text.
func yamlText(t *testing.T, objects []object) string {
	t.Helper()
	var b strings.Builder
	for _, o := range objects {
		text, err := yaml.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString("---\n")
		b.Write(text)
	}
	return b.String()
}

// overlay is one rendered zone overlay of istio/.
type overlay struct {
	zone string
	// istio: the Istio configuration (EnvoyFilters, WasmPlugins, ...); kube: the Namespaces
	// and Services (the rest of what keyway installs does not reach a sidecar).
	istio, kube []object
	all         []object
}

// overlays renders every zone overlay with `kubectl kustomize` ($KEYWAY_KUBECTL, which
// `make istio-xds` sets from scripts/install-kubectl.sh), on a copy of istio/ in which each secret
// file the overlay generates Secrets from is a placeholder (the real ones are never committed).
func overlays(t *testing.T) []overlay {
	t.Helper()
	kubectl := os.Getenv("KEYWAY_KUBECTL")
	if kubectl == "" {
		t.Fatal("KEYWAY_KUBECTL is not set: run `make istio-xds`, or set it to the output of scripts/install-kubectl.sh")
	}
	tmp := t.TempDir()
	if out, err := exec.Command("cp", "-r", filepath.Join(repoRoot(t), "istio"), tmp).CombinedOutput(); err != nil {
		t.Fatalf("copy istio/: %v: %s", err, out)
	}
	zones, err := filepath.Glob(filepath.Join(tmp, "istio", "overlays", "*", "kustomization.yaml"))
	if err != nil || len(zones) == 0 {
		t.Fatalf("no overlays under istio/overlays (%v)", err)
	}
	var out []overlay
	for _, k := range zones {
		dir := filepath.Dir(k)
		placeholderSecrets(t, dir)
		rendered, err := exec.Command(kubectl, "kustomize", dir).Output()
		if err != nil {
			t.Fatalf("kubectl kustomize %s: %v", dir, err)
		}
		o := overlay{zone: filepath.Base(dir)}
		for _, obj := range documents(t, dir, rendered) {
			o.all = append(o.all, obj)
			group := strings.SplitN(str(obj, "apiVersion"), "/", 2)[0]
			switch {
			case strings.HasSuffix(group, "istio.io"):
				o.istio = append(o.istio, obj)
			case str(obj, "kind") == "Namespace" || str(obj, "kind") == "Service":
				o.kube = append(o.kube, obj)
			}
		}
		out = append(out, o)
	}
	return out
}

func placeholderSecrets(t *testing.T, dir string) {
	t.Helper()
	var k object
	text, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(text, &k); err != nil {
		t.Fatal(err)
	}
	for _, g := range list(k, "secretGenerator") {
		for _, f := range list(g, "files") {
			rel := fmt.Sprint(f)
			if _, p, ok := strings.Cut(rel, "="); ok {
				rel = p
			}
			path := filepath.Join(dir, rel)
			if _, err := os.Stat(path); err == nil {
				continue
			}
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, []byte("placeholder written by istio-check/xds\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
}

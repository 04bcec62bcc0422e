package xds

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pilot/pkg/simulation"
	pilotxds "istio.io/istio/pilot/test/xds"
)

// pins: what each pinned istio.io/istio module version is, by module version: a short name (the
// subtest and dump directory names) and the proxy version its sidecars report. The Go module proxy
// serves no tagged release of istio.io/istio (its tags lack the `v`), only a few commits
// (istio/README.md, "Pinned versions").
var pins = map[string]struct{ name, proxy string }{
	// release-1.30 on 2026-08-26: after 1.30.3 (VERSION 1.30). Four dependency versions it requires
	// are not served; its module file says which stand in for them.
	"v0.0.0-20260826214018-9739e10eb9d7": {"release-1.30-20260826", "1.30.3"},
	// release-1.31 on 2026-08-27: after 1.31.0-rc.0.
	"v0.0.0-20260827124520-eed52ebb66ad": {"release-1.31-20260827", "1.31.0"},
}

// release returns the pinned istio.io/istio module version, its short name and the proxy version
// it stands for. Test binaries carry no module versions, so the go command says which module file
// is in use (go.mod, or the one GOFLAGS=-modfile=... names).
func release(t *testing.T) (module, name, proxy string) {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Version}}", "istio.io/istio").Output()
	if err != nil {
		t.Fatalf("go list -m istio.io/istio: %v", err)
	}
	module = strings.TrimSpace(string(out))
	pin, ok := pins[module]
	if !ok {
		t.Fatalf("istio.io/istio %q has no entry in pins: add what it is", module)
	}
	return module, pin.name, pin.proxy
}

// sidecar is what pilot generates for one pod.
type sidecar struct {
	pod       pod
	proxy     *model.Proxy
	sim       *simulation.Simulation
	listeners []*listener.Listener
	clusters  []*cluster.Cluster
	ecds      []*core.TypedExtensionConfig
	refs      []ecdsRef
}

// ecdsRef is one filter that takes its configuration over ECDS.
type ecdsRef struct {
	listener, chain, name string
	typeURLs              []string
	http                  bool
}

// server starts Istio's fake discovery server on the mesh and the given Istio configuration
// and keyway Kubernetes objects.
func server(t *testing.T, m *mesh, istioConfig, kube []object) *pilotxds.FakeDiscoveryServer {
	t.Helper()
	objects := append(append([]object{}, m.objects...), kube...)
	return pilotxds.NewFakeDiscoveryServer(t, pilotxds.FakeOptions{
		ConfigString:           yamlText(t, istioConfig),
		KubernetesObjectString: yamlText(t, objects),
	})
}

// generate builds the sidecar of p: LDS and CDS as pilot pushes them, and ECDS for every name
// the listeners reference.
func generate(t *testing.T, s *pilotxds.FakeDiscoveryServer, p pod, version string, hbone bool) *sidecar {
	t.Helper()
	meta := &model.NodeMetadata{
		IstioVersion: version, Labels: p.labels, Annotations: p.annotations, Namespace: p.namespace,
		ClusterID: "Kubernetes", ServiceAccount: p.serviceAccount, NodeName: "node-1",
		WorkloadName: strings.TrimSuffix(p.name, "-0"), InstanceIPs: []string{p.ip},
	}
	if hbone {
		meta.EnableHBONE = true
	}
	proxy := s.SetupProxy(&model.Proxy{
		ID: p.name + "." + p.namespace, ConfigNamespace: p.namespace, IPAddresses: []string{p.ip},
		Labels: p.labels, Metadata: meta,
	})
	sc := &sidecar{pod: p, proxy: proxy}
	sc.sim = simulation.NewSimulation(t, s, proxy)
	sc.listeners = sc.sim.Listeners
	sc.clusters = sc.sim.Clusters
	sc.refs = ecdsRefs(t, sc.listeners)
	names := map[string]bool{}
	var requested []string
	for _, r := range sc.refs {
		if !names[r.name] {
			names[r.name] = true
			requested = append(requested, r.name)
		}
	}
	sc.ecds = s.ConfigGen.BuildExtensionConfiguration(proxy, s.PushContext(), requested, nil)
	return sc
}

// chains lists a listener's filter chains, the default one included.
func chains(l *listener.Listener) []*listener.FilterChain {
	out := append([]*listener.FilterChain{}, l.GetFilterChains()...)
	if l.GetDefaultFilterChain() != nil {
		out = append(out, l.GetDefaultFilterChain())
	}
	return out
}

// connectionManager returns the HTTP connection manager of a network filter, if it is one.
func connectionManager(t *testing.T, f *listener.Filter) *hcm.HttpConnectionManager {
	t.Helper()
	if f.GetTypedConfig() == nil || f.GetTypedConfig().GetTypeUrl() != "type.googleapis.com/"+string(proto.MessageName(&hcm.HttpConnectionManager{})) {
		return nil
	}
	m := &hcm.HttpConnectionManager{}
	if err := f.GetTypedConfig().UnmarshalTo(m); err != nil {
		t.Fatalf("filter %s: %v", f.GetName(), err)
	}
	return m
}

func ecdsRefs(t *testing.T, listeners []*listener.Listener) []ecdsRef {
	t.Helper()
	var out []ecdsRef
	for _, l := range listeners {
		for _, fc := range chains(l) {
			for _, f := range fc.GetFilters() {
				if cd := f.GetConfigDiscovery(); cd != nil {
					out = append(out, ecdsRef{l.GetName(), fc.GetName(), f.GetName(), cd.GetTypeUrls(), false})
				}
				if m := connectionManager(t, f); m != nil {
					for _, hf := range m.GetHttpFilters() {
						if cd := hf.GetConfigDiscovery(); cd != nil {
							out = append(out, ecdsRef{l.GetName(), fc.GetName(), hf.GetName(), cd.GetTypeUrls(), true})
						}
					}
				}
			}
		}
	}
	return out
}

func messages[T proto.Message](in []T) []proto.Message {
	out := make([]proto.Message, len(in))
	for i, m := range in {
		out[i] = m
	}
	return out
}

// anyOf wraps a message for Istio's agent-side conversion.
func anyOf(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func describeFilters(fc *listener.FilterChain) string {
	var names []string
	for _, f := range fc.GetFilters() {
		names = append(names, f.GetName())
	}
	return fmt.Sprintf("chain %q %v", fc.GetName(), names)
}

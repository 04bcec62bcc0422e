package xds

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	httprbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	httpwasm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/wasm/v3"
	networkrbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	networkwasm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/wasm/v3"
	wasmext "github.com/envoyproxy/go-control-plane/envoy/extensions/wasm/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"istio.io/istio/pilot/pkg/simulation"
	"istio.io/istio/pkg/wasm"
)

// The keyway filter's modes (filter/src/config.rs) and what keyway's Istio configuration names.
const (
	modeOutbound      = "outbound"
	modeInboundPlain  = "inbound_plain"
	modeInboundTunnel = "inbound_tunnel"
	gatewayCluster    = "keyway_gateway"
	keyServiceCluster = "keyway_keyservice"
	inboundListener   = "keyway_inbound"
	overlayChain      = "keyway_overlay"
	inboundPort       = 15181
	// unknownIP: an address outside the mesh and the overlay (TEST-NET-3); nothing is sent to it,
	// the simulation only walks the generated configuration.
	unknownIP = "203.0.113.7"
	// httpInspector: Istio's HTTP detection on outbound listeners, which keyway removes.
	httpInspector = "envoy.filters.listener.http_inspector"
	// unknownPort: a port no Service of the mesh uses.
	unknownPort = 12345
)

// world is one zone overlay loaded into pilot, with the baseline (the mesh without keyway).
type world struct {
	release, proxyVersion string // the pin's short name, the proxy version
	trustDomain           string // the mesh's, as pilot has it
	mesh                  *mesh
	zone                  overlay
	sidecars              []*sidecar
	baseline              map[string]*sidecar // non-enforced pods, generated without keyway
}

// worlds loads every zone overlay; the sidecars of every pod, enforced ones with and without
// Istio's HBONE inbound (ENABLE_HBONE), so that 15008 is covered where Istio builds it.
func worlds(t *testing.T) []*world {
	t.Helper()
	module, name, version := release(t)
	t.Logf("istio.io/istio %s (%s, proxy %s)", module, name, version)
	m := loadShop(t)
	base := server(t, m, nil, nil)
	baseline := map[string]*sidecar{}
	for _, p := range m.pods {
		if !p.enforced {
			baseline[p.key()] = generate(t, base, p, version, false)
		}
	}
	var out []*world
	for _, o := range overlays(t) {
		w := &world{release: name, proxyVersion: version, mesh: m, zone: o, baseline: baseline}
		s := server(t, m, o.istio, o.kube)
		w.trustDomain = s.PushContext().Mesh.GetTrustDomain()
		for _, p := range m.pods {
			variants := []bool{false}
			if p.enforced {
				variants = append(variants, true)
			}
			for _, hbone := range variants {
				sc := generate(t, s, p, version, hbone)
				w.sidecars = append(w.sidecars, sc)
			}
		}
		out = append(out, w)
	}
	dumpDataPath(t, name, version)
	return out
}

var loaded []*world

// each runs f for every zone overlay and every sidecar that pass keep.
// It returns how many sidecars it ran f for.
func each(t *testing.T, keep func(*sidecar) bool, f func(t *testing.T, w *world, sc *sidecar)) int {
	if loaded == nil {
		loaded = worlds(t)
	}
	n := 0
	for _, w := range loaded {
		for _, sc := range w.sidecars {
			if !keep(sc) {
				continue
			}
			name := fmt.Sprintf("%s/%s/%s", w.release, w.zone.zone, sc.pod.key())
			if sc.proxy.Metadata.EnableHBONE {
				name += "+hbone"
			}
			t.Run(name, func(t *testing.T) { f(t, w, sc) })
			n++
		}
	}
	return n
}

func enforced(sc *sidecar) bool       { return sc.pod.enforced }
func notEnforcedPod(sc *sidecar) bool { return !sc.pod.enforced }

// served returns the ECDS configuration pilot serves under name, if any.
func (sc *sidecar) served(name string) *core.TypedExtensionConfig {
	for _, e := range sc.ecds {
		if e.GetName() == name {
			return e
		}
	}
	return nil
}

// pluginMode reads the keyway mode out of a served wasm configuration ("" if it is not keyway's).
func pluginMode(t *testing.T, ec *core.TypedExtensionConfig) string {
	t.Helper()
	if ec == nil {
		return ""
	}
	var cfg *wasmext.PluginConfig
	switch ec.GetTypedConfig().GetTypeUrl() {
	case typeURL(&networkwasm.Wasm{}):
		w := &networkwasm.Wasm{}
		if err := ec.GetTypedConfig().UnmarshalTo(w); err != nil {
			t.Fatal(err)
		}
		cfg = w.GetConfig()
	case typeURL(&httpwasm.Wasm{}):
		w := &httpwasm.Wasm{}
		if err := ec.GetTypedConfig().UnmarshalTo(w); err != nil {
			t.Fatal(err)
		}
		cfg = w.GetConfig()
	default:
		return ""
	}
	var text []byte
	switch c := cfg.GetConfiguration(); c.GetTypeUrl() {
	case typeURL(&wrapperspb.StringValue{}):
		s := &wrapperspb.StringValue{}
		if err := c.UnmarshalTo(s); err != nil {
			t.Fatal(err)
		}
		text = []byte(s.GetValue())
	case typeURL(&structpb.Struct{}):
		s := &structpb.Struct{}
		if err := c.UnmarshalTo(s); err != nil {
			t.Fatal(err)
		}
		text, _ = s.MarshalJSON()
	default:
		return ""
	}
	var settings struct {
		Mode string `json:"mode"`
	}
	if json.Unmarshal(text, &settings) != nil {
		return ""
	}
	return settings.Mode
}

func typeURL(m proto.Message) string { return "type.googleapis.com/" + string(proto.MessageName(m)) }

// keywayFirst reports whether a filter chain's first filter is the keyway filter in mode, as
// pilot serves it over ECDS.
func (sc *sidecar) keywayFirst(t *testing.T, fc *listener.FilterChain, mode string) bool {
	t.Helper()
	filters := fc.GetFilters()
	if len(filters) == 0 || filters[0].GetConfigDiscovery() == nil {
		return false
	}
	return pluginMode(t, sc.served(filters[0].GetName())) == mode
}

// Every ECDS name a listener references is served, with a type the reference accepts; and so
// is what Istio's agent substitutes when the module cannot be fetched (an RBAC filter: deny for
// FAIL_CLOSE, allow for FAIL_OPEN; pkg/wasm MaybeConvertWasmExtensionConfig), and what it sends
// when the fetch succeeds (the module as a local file).
func TestEveryReferencedExtensionIsServedWithAnAcceptedType(t *testing.T) {
	refs := 0
	n := each(t, func(*sidecar) bool { return true }, func(t *testing.T, w *world, sc *sidecar) {
		refs += len(sc.refs)
		for _, r := range sc.refs {
			ec := sc.served(r.name)
			if ec == nil {
				t.Errorf("listener %s chain %q references ECDS %q, which istiod does not serve (served: %v): the listener would stay warming",
					r.listener, r.chain, r.name, names(sc.ecds))
				continue
			}
			accepts := func(what string, got string) {
				if !contains(r.typeURLs, got) {
					t.Errorf("ECDS %q (%s) has type %s, which the reference in listener %s does not accept (type_urls %v): Envoy rejects it",
						r.name, what, got, r.listener, r.typeURLs)
				}
			}
			accepts("as served", ec.GetTypedConfig().GetTypeUrl())
			for _, c := range []struct {
				what  string
				cache wasm.Cache
			}{{"module fetch failed", failingCache{}}, {"module fetched", fetchedCache{}}} {
				out, err := agentConverted(t, ec, c.cache)
				if err != nil {
					t.Errorf("ECDS %q: Istio's agent cannot convert it (%s): %v", r.name, c.what, err)
					continue
				}
				accepts(c.what, out.GetTypedConfig().GetTypeUrl())
				if c.what == "module fetch failed" && pluginMode(t, ec) != "" {
					if prefix := rbacStatPrefix(t, out); prefix != wasm.DefaultDenyStatPrefix {
						t.Errorf("ECDS %q: a failed fetch of keyway's module gives %q, not the deny-all filter (FAIL_CLOSE)", r.name, prefix)
					}
				}
			}
		}
	})
	t.Logf("%d sidecars, %d ECDS references, each also through the agent with the module fetched and not", n, refs)
}

// agentConverted is what Istio's agent sends Envoy in place of ec, fetching modules through cache.
func agentConverted(t *testing.T, ec *core.TypedExtensionConfig, cache wasm.Cache) (*core.TypedExtensionConfig, error) {
	t.Helper()
	converted := []*anypb.Any{anyOf(t, proto.Clone(ec))}
	if err := wasm.MaybeConvertWasmExtensionConfig(converted, cache); err != nil {
		return nil, err
	}
	out := &core.TypedExtensionConfig{}
	if err := converted[0].UnmarshalTo(out); err != nil {
		t.Fatal(err)
	}
	return out, nil
}

// failingCache: the module cannot be fetched.
type failingCache struct{}

func (failingCache) Get(url string, _ wasm.GetOptions) (string, error) {
	return "", fmt.Errorf("fetch of %s failed (simulated)", url)
}
func (failingCache) Cleanup() {}

// fetchedCache: the module is in the agent's cache.
type fetchedCache struct{}

func (fetchedCache) Get(string, wasm.GetOptions) (string, error) {
	return "/var/lib/istio/data/keyway.wasm", nil
}
func (fetchedCache) Cleanup() {}

func rbacStatPrefix(t *testing.T, ec *core.TypedExtensionConfig) string {
	t.Helper()
	switch ec.GetTypedConfig().GetTypeUrl() {
	case typeURL(&networkrbac.RBAC{}):
		r := &networkrbac.RBAC{}
		if err := ec.GetTypedConfig().UnmarshalTo(r); err != nil {
			t.Fatal(err)
		}
		return r.GetStatPrefix()
	case typeURL(&httprbac.RBAC{}):
		// The HTTP RBAC filter has no stat prefix of its own: deny-all is rules with no policy.
		r := &httprbac.RBAC{}
		if err := ec.GetTypedConfig().UnmarshalTo(r); err != nil {
			t.Fatal(err)
		}
		if r.GetRules() != nil && len(r.GetRules().GetPolicies()) == 0 {
			return wasm.DefaultDenyStatPrefix
		}
		return wasm.DefaultAllowStatPrefix
	}
	return ec.GetTypedConfig().GetTypeUrl()
}

func names(ecs []*core.TypedExtensionConfig) []string {
	var out []string
	for _, e := range ecs {
		out = append(out, e.GetName())
	}
	return out
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// Egress default deny (issue 11, finding 3): every outbound filter chain of an enforced pod, on
// 15001 (its passthrough and blackhole chains included) and on every per-port and per-Service
// listener, starts with keyway's outbound filter and ends in the tcp_proxy that tunnels to the
// gateway with the token; no chain keeps Istio's own route (an HTTP connection manager, a
// tcp_proxy to a Service, PassthroughCluster or BlackHoleCluster). And the simulation of Istio's
// capture (iptables to 15001, then the listener of the original destination) takes every kind of
// outbound connection through the filter into the keyway tunnel: overlay addresses, mesh Service
// VIPs on HTTP and TCP ports, unknown addresses (passthrough), over TCP and HTTP. No outbound
// listener keeps Istio's HTTP detection, which waits for the client without a timeout.
func TestEveryOutboundConnectionOfAnEnforcedPodReachesKeyway(t *testing.T) {
	chainCount, calls := 0, 0
	kinds := map[string]int{}
	n := each(t, enforced, func(t *testing.T, w *world, sc *sidecar) {
		for _, l := range sc.listeners {
			if l.GetTrafficDirection() != core.TrafficDirection_OUTBOUND {
				continue
			}
			// No listener filter waits for the client's first bytes (Istio's HTTP detection has
			// no timeout): a server-first protocol would never get its first byte through.
			for _, lf := range l.GetListenerFilters() {
				if lf.GetName() == httpInspector {
					t.Errorf("outbound listener %s keeps %s: server-first connections wait for the client forever", l.GetName(), httpInspector)
				}
			}
			for _, fc := range chains(l) {
				chainCount++
				if !sc.keywayFirst(t, fc, modeOutbound) {
					t.Errorf("outbound listener %s: %s does not start with keyway's outbound filter", l.GetName(), describeFilters(fc))
				}
				if err := tunnelsToTheGateway(t, fc); err != nil {
					t.Errorf("outbound listener %s: %s: %v", l.GetName(), describeFilters(fc), err)
				}
			}
		}
		for _, c := range outboundCalls(w.mesh) {
			var matched *listener.FilterChain
			c.call.CallMode = simulation.CallModeOutbound
			c.call.CustomListenerValidations = []simulation.CustomFilterChainValidation{func(fc *listener.FilterChain) error {
				matched = fc
				return nil
			}}
			r := sc.sim.Run(c.call)
			calls++
			what := fmt.Sprintf("%s %s:%d (%s)", c.what, c.call.Address, c.call.Port, c.call.Protocol)
			switch {
			case r.Error != nil:
				t.Errorf("%s: %v (listener %q)", what, r.Error, r.ListenerMatched)
			case matched == nil || !sc.keywayFirst(t, matched, modeOutbound):
				t.Errorf("%s: listener %s, %s: does not reach keyway's outbound filter", what, r.ListenerMatched, describeFilters(matched))
			case r.ClusterMatched != gatewayCluster:
				t.Errorf("%s: listener %s chain %q goes to %q, not the keyway tunnel %s", what, r.ListenerMatched, r.FilterChainMatched, r.ClusterMatched, gatewayCluster)
			case c.overlay && r.FilterChainMatched != overlayChain:
				t.Errorf("%s: listener %s takes chain %q, not keyway's overlay chain %s", what, r.ListenerMatched, r.FilterChainMatched, overlayChain)
			}
			kinds[strings.SplitN(c.what, " ", 3)[0]+" "+strings.SplitN(c.what, " ", 3)[1]]++
		}
	})
	for _, k := range []string{"overlay address", "mesh Service", "unknown address"} {
		if kinds[k] == 0 {
			t.Errorf("no simulated connection to a %s reached the tunnel", k)
		}
	}
	t.Logf("%d sidecars, %d outbound filter chains, %d simulated outbound connections, all into the tunnel (%v)", n, chainCount, calls, kinds)
}

// tunnelsToTheGateway checks that an outbound filter chain ends in keyway's tunnel: tcp_proxy to
// the gateway cluster, HTTP/2 CONNECT to the original destination with the token.
func tunnelsToTheGateway(t *testing.T, fc *listener.FilterChain) error {
	t.Helper()
	filters := fc.GetFilters()
	if len(filters) == 0 {
		return fmt.Errorf("no filters")
	}
	for _, f := range filters {
		if connectionManager(t, f) != nil {
			return fmt.Errorf("keeps an HTTP connection manager (Istio's routes)")
		}
	}
	last := filters[len(filters)-1]
	tp := &tcpproxy.TcpProxy{}
	if last.GetTypedConfig().GetTypeUrl() != typeURL(tp) {
		return fmt.Errorf("ends in %s, not tcp_proxy", last.GetName())
	}
	if err := last.GetTypedConfig().UnmarshalTo(tp); err != nil {
		t.Fatal(err)
	}
	tc := tp.GetTunnelingConfig()
	switch {
	case tp.GetCluster() != gatewayCluster:
		return fmt.Errorf("tcp_proxy goes to %q, not the keyway tunnel %s", tp.GetCluster(), gatewayCluster)
	case tc.GetHostname() != "%DOWNSTREAM_LOCAL_ADDRESS%":
		return fmt.Errorf("tcp_proxy does not tunnel to the original destination (tunneling_config %v)", tc)
	case len(tc.GetHeadersToAdd()) != 1 || tc.GetHeadersToAdd()[0].GetHeader().GetKey() != "x-keyway-token" ||
		tc.GetHeadersToAdd()[0].GetHeader().GetValue() != "%FILTER_STATE(wasm.keyway_token:PLAIN)%":
		return fmt.Errorf("the tunnel does not carry the token: %v", tc.GetHeadersToAdd())
	}
	return nil
}

type outboundCall struct {
	what    string
	call    simulation.Call
	overlay bool
}

func outboundCalls(m *mesh) []outboundCall {
	var out []outboundCall
	ports := map[int]string{443: "tcp", unknownPort: "tcp"}
	for _, s := range m.services {
		for _, p := range s.ports {
			ports[p.port] = p.protocol
			proto, host := simulation.TCP, ""
			if p.protocol == "http" {
				proto, host = simulation.HTTP, s.name+"."+s.namespace+".svc.cluster.local"
			}
			out = append(out, outboundCall{
				what: "mesh Service " + s.namespace + "/" + s.name,
				call: simulation.Call{Address: s.vip, Port: p.port, Protocol: proto, HostHeader: host},
			})
		}
	}
	var overlayIPs []string
	for _, p := range m.pods {
		overlayIPs = append(overlayIPs, strings.Split(p.annotations["keyway.io/overlay-ips"], ",")...)
	}
	for _, s := range m.services {
		overlayIPs = append(overlayIPs, s.overlayIPs...)
	}
	sortedPorts := make([]int, 0, len(ports))
	for p := range ports {
		sortedPorts = append(sortedPorts, p)
	}
	sort.Ints(sortedPorts)
	for _, port := range sortedPorts {
		protos := []simulation.Protocol{simulation.TCP}
		if ports[port] == "http" {
			protos = append(protos, simulation.HTTP)
		}
		for _, proto := range protos {
			for _, ip := range overlayIPs {
				if _, err := netip.ParseAddr(ip); err != nil || ip == "" {
					continue
				}
				out = append(out, outboundCall{what: "overlay address", call: simulation.Call{Address: ip, Port: port, Protocol: proto}, overlay: true})
			}
			out = append(out, outboundCall{what: "unknown address", call: simulation.Call{Address: unknownIP, Port: port, Protocol: proto}})
		}
	}
	return out
}

// Every inbound filter chain of an enforced pod Istio captures (15006: per port, passthrough;
// 15008 where Istio builds it) starts with keyway's inbound_plain filter, which closes plain
// connections; the simulation of Istio's inbound capture on every port of the pod agrees. The
// keyway inbound listener (15181) is there, with the ticket filter first and a CONNECT route to
// every application port of the pod.
func TestEveryCapturedInboundChainOfAnEnforcedPodClosesPlainConnections(t *testing.T) {
	chainCount, calls := 0, 0
	n := each(t, enforced, func(t *testing.T, w *world, sc *sidecar) {
		for _, l := range sc.listeners {
			if !captured(l) || l.GetName() == inboundListener {
				continue
			}
			for _, fc := range chains(l) {
				chainCount++
				if !sc.keywayFirst(t, fc, modeInboundPlain) {
					t.Errorf("inbound listener %s: %s does not start with keyway's inbound_plain filter", l.GetName(), describeFilters(fc))
				}
			}
		}
		for _, l := range sc.listeners {
			if l.GetTrafficDirection() == core.TrafficDirection_UNSPECIFIED && !captured(l) {
				t.Errorf("listener %s has no traffic direction: the harness does not know whether it is captured", l.GetName())
			}
		}
		ports := append(appPorts(sc.pod, w.mesh), unknownPort)
		for _, port := range ports {
			for _, c := range []simulation.Call{
				{Address: sc.pod.ip, Port: port, Protocol: simulation.TCP},
				{Address: sc.pod.ip, Port: port, Protocol: simulation.HTTP},
				{Address: sc.pod.ip, Port: port, Protocol: simulation.TCP, TLS: simulation.MTLS},
			} {
				var matched *listener.FilterChain
				c.CallMode = simulation.CallModeInbound
				c.CustomListenerValidations = []simulation.CustomFilterChainValidation{func(fc *listener.FilterChain) error {
					matched = fc
					return nil
				}}
				r := sc.sim.Run(c)
				calls++
				what := fmt.Sprintf("inbound %s:%d (%s, %s)", c.Address, port, c.Protocol, c.TLS)
				if r.Error != nil && matched == nil {
					t.Errorf("%s: %v", what, r.Error)
				} else if !sc.keywayFirst(t, matched, modeInboundPlain) {
					t.Errorf("%s: listener %s, %s: does not reach keyway's inbound_plain filter", what, r.ListenerMatched, describeFilters(matched))
				}
			}
		}
		checkInboundListener(t, sc, appPorts(sc.pod, w.mesh))
	})
	t.Logf("%d sidecars, %d captured inbound filter chains, %d simulated inbound connections", n, chainCount, calls)
}

// hbonePort: Istio's HBONE inbound port (its listener, connect_terminate, has no traffic direction).
const hbonePort = 15008

// captured reports whether a listener takes inbound connections of the pod.
func captured(l *listener.Listener) bool {
	return l.GetTrafficDirection() == core.TrafficDirection_INBOUND || l.GetAddress().GetSocketAddress().GetPortValue() == hbonePort
}

// appPorts: the container ports of the pod's workload.
func appPorts(p pod, m *mesh) []int {
	var out []int
	for _, o := range m.objects {
		if str(o, "kind") != "Pod" || str(o, "metadata", "name") != p.name || str(o, "metadata", "namespace") != p.namespace {
			continue
		}
		for _, c := range list(o, "spec", "containers") {
			for _, cp := range list(c, "ports") {
				out = append(out, intOf(get(cp, "containerPort")))
			}
		}
	}
	return out
}

func checkInboundListener(t *testing.T, sc *sidecar, ports []int) {
	t.Helper()
	var l *listener.Listener
	for _, x := range sc.listeners {
		if x.GetName() == inboundListener {
			l = x
		}
	}
	if l == nil {
		t.Errorf("no listener %s", inboundListener)
		return
	}
	if a := l.GetAddress().GetSocketAddress(); a.GetPortValue() != inboundPort {
		t.Errorf("%s listens on %v", inboundListener, a)
	}
	fcs := chains(l)
	if len(fcs) != 1 || len(fcs[0].GetFilters()) != 1 {
		t.Errorf("%s: want one chain with one filter (the connection manager), got %d chains", inboundListener, len(fcs))
		return
	}
	m := connectionManager(t, fcs[0].GetFilters()[0])
	if m == nil {
		t.Errorf("%s: the filter is not an HTTP connection manager", inboundListener)
		return
	}
	hf := m.GetHttpFilters()
	if len(hf) < 2 || hf[0].GetConfigDiscovery() == nil || pluginMode(t, sc.served(hf[0].GetName())) != modeInboundTunnel {
		t.Errorf("%s: the first HTTP filter is not keyway's inbound_tunnel (ticket) filter: %v", inboundListener, hf)
	}
	if hf[len(hf)-1].GetName() != "envoy.filters.http.router" {
		t.Errorf("%s: the last HTTP filter is %s, not the router", inboundListener, hf[len(hf)-1].GetName())
	}
	if d := m.GetStreamIdleTimeout(); d == nil || d.AsDuration() != 0 {
		t.Errorf("%s: stream_idle_timeout is %v: Envoy's default (5 min) resets idle tunnels; want 0s", inboundListener, d)
	}
	clusters := map[string]bool{}
	for _, c := range sc.clusters {
		clusters[c.GetName()] = true
	}
	hosts := map[string]string{}
	for _, vh := range m.GetRouteConfig().GetVirtualHosts() {
		for _, r := range vh.GetRoutes() {
			if r.GetMatch().GetConnectMatcher() == nil {
				continue
			}
			for _, d := range vh.GetDomains() {
				hosts[d] = r.GetRoute().GetCluster()
			}
		}
	}
	for _, p := range ports {
		c, ok := hosts[fmt.Sprintf("*:%d", p)]
		switch {
		case !ok:
			t.Errorf("%s: no CONNECT route for the pod's port %d", inboundListener, p)
		case !clusters[c]:
			t.Errorf("%s: port %d routes to cluster %q, which CDS does not have", inboundListener, p, c)
		}
	}
	for _, c := range []string{gatewayCluster, keyServiceCluster} {
		if !clusters[c] {
			t.Errorf("no cluster %s", c)
		}
	}
}

// A pod without the enforce label gets exactly the listeners and clusters Istio generates for it
// without keyway.
func TestPodsNotEnforcedAreUnchanged(t *testing.T) {
	n := each(t, notEnforcedPod, func(t *testing.T, w *world, sc *sidecar) {
		want := w.baseline[sc.pod.key()]
		if d := cmp.Diff(byName(want.listeners), byName(sc.listeners), protocmp.Transform()); d != "" {
			t.Errorf("listeners differ from Istio's without keyway (-without +with):\n%s", clip(d))
		}
		if d := cmp.Diff(byName(want.clusters), byName(sc.clusters), protocmp.Transform()); d != "" {
			t.Errorf("clusters differ from Istio's without keyway (-without +with):\n%s", clip(d))
		}
		if len(sc.refs) != 0 {
			t.Errorf("references ECDS: %v", sc.refs)
		}
	})
	t.Logf("%d sidecars compared with Istio's output without keyway", n)
}

type named interface {
	proto.Message
	GetName() string
}

func byName[T named](in []T) map[string]T {
	out := map[string]T{}
	for _, x := range in {
		out[x.GetName()] = x
	}
	return out
}

func clip(s string) string {
	if len(s) > 4000 {
		return s[:4000] + "\n..."
	}
	return s
}

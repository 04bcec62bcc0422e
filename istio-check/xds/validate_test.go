package xds

import (
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

	"istio.io/istio/pkg/wasm"
)

// Envoy validates every resource it is sent against the constraints of its API (protoc-gen-validate
// rules: required fields, ranges, enums), typed configurations included, and rejects the resource
// when one fails. The same rules, generated into go-control-plane, run here over everything pilot
// generates for every sidecar (listeners, clusters), and over what Istio's agent turns the extension
// configurations into. Types the Go registry does not know (none today) are counted, not validated.
// keyway's TLS contexts (issue 11: the two gateway clusters and the keyway inbound listener of every
// enforced sidecar) are among what is validated, and counted.
func TestEnvoyValidatesEveryGeneratedResource(t *testing.T) {
	resources, tlsContexts := 0, 0
	upstream, downstream := typeURL(&tlsv3.UpstreamTlsContext{}), typeURL(&tlsv3.DownstreamTlsContext{})
	n := each(t, func(*sidecar) bool { return true }, func(t *testing.T, w *world, sc *sidecar) {
		v := &validation{t: t, unknown: map[string]bool{}, keyway: map[string]int{}}
		resources += len(sc.listeners) + len(sc.clusters) + 2*len(sc.ecds)
		for _, l := range sc.listeners {
			v.message("listener "+l.GetName(), l)
		}
		for _, c := range sc.clusters {
			v.message("cluster "+c.GetName(), c)
		}
		if sc.pod.enforced {
			v.keywayTLS(sc)
			if v.keyway[upstream] != 2 || v.keyway[downstream] != 1 {
				t.Errorf("validated keyway TLS contexts %v: want the 2 gateway clusters' %s and the keyway inbound listener's %s", v.keyway, upstream, downstream)
			}
			tlsContexts += v.keyway[upstream] + v.keyway[downstream]
		}
		// Envoy gets the extension configurations from Istio's agent, never as istiod serves them
		// (a remote module, which the agent fetches: istiod's form lacks the sha256 Envoy would
		// require of a remote source it fetched itself): validate what the agent sends.
		for _, ec := range sc.ecds {
			for _, cache := range []wasm.Cache{failingCache{}, fetchedCache{}} {
				if converted, err := agentConverted(t, ec, cache); err == nil {
					v.message("extension configuration "+ec.GetName()+" as the agent sends it", converted)
				}
			}
		}
		if len(v.unknown) > 0 {
			t.Logf("typed configurations not validated (type unknown to the Go registry): %v", v.unknown)
		}
	})
	t.Logf("%d sidecars, %d resources (extension configurations twice: module fetched and not), %d keyway TLS contexts among them", n, resources, tlsContexts)
}

type validation struct {
	t       *testing.T
	unknown map[string]bool
	keyway  map[string]int // keyway's TLS contexts validated, by type
}

// keywayTLS validates the transport sockets of keyway's gateway clusters and inbound listener on
// their own (they were validated within their resources already) and counts them by type.
func (v *validation) keywayTLS(sc *sidecar) {
	v.t.Helper()
	var sockets []*core.TransportSocket
	for _, name := range []string{gatewayCluster, keyServiceCluster} {
		if c := clusterNamed(sc, name); c != nil {
			sockets = append(sockets, c.GetTransportSocket())
		}
	}
	if l := listenerNamed(sc, inboundListener); l != nil {
		for _, fc := range chains(l) {
			sockets = append(sockets, fc.GetTransportSocket())
		}
	}
	for _, ts := range sockets {
		if ts.GetTypedConfig() == nil {
			continue
		}
		inner, err := ts.GetTypedConfig().UnmarshalNew()
		if err != nil {
			v.t.Errorf("keyway transport socket %s: %v", ts.GetName(), err)
			continue
		}
		v.message("keyway transport socket "+ts.GetName(), inner)
		v.keyway[ts.GetTypedConfig().GetTypeUrl()]++
	}
}

// message validates m and every message packed in an Any inside it.
func (v *validation) message(where string, m proto.Message) {
	v.t.Helper()
	if c, ok := m.(interface{ ValidateAll() error }); ok {
		if err := c.ValidateAll(); err != nil {
			v.t.Errorf("%s: Envoy would reject it: %v", where, err)
		}
	}
	v.anys(where, m.ProtoReflect())
}

func (v *validation) anys(where string, m protoreflect.Message) {
	v.t.Helper()
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			v.unknown[a.GetTypeUrl()] = true
			return
		}
		v.message(where+" > "+a.GetTypeUrl(), inner)
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, val protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			for i := 0; i < val.List().Len(); i++ {
				v.anys(where, val.List().Get(i).Message())
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			val.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				v.anys(where, mv.Message())
				return true
			})
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			v.anys(where, val.Message())
		}
		return true
	})
}

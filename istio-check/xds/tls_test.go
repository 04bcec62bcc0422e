package xds

import (
	"fmt"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpopts "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	"istio.io/istio/pkg/model"
)

// tunnelPort: the gateway's one port for the sidecars, tunnel and key service (mutual TLS, HTTP/2).
const tunnelPort = 15180

// gatewayIdentity is the mesh identity of the zone's gateways: the SPIFFE id of the service
// account the rendered gateway Deployment runs as, in the mesh's trust domain.
func gatewayIdentity(t *testing.T, w *world) string {
	t.Helper()
	for _, o := range w.zone.all {
		if str(o, "kind") == "Deployment" && str(o, "metadata", "name") == "keyway-gateway" {
			sa := str(o, "spec", "template", "spec", "serviceAccountName")
			if sa == "" {
				t.Fatalf("%s: the gateway Deployment names no service account", w.zone.zone)
			}
			return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", w.trustDomain, str(o, "metadata", "namespace"), sa)
		}
	}
	t.Fatalf("%s: no Deployment keyway-gateway rendered", w.zone.zone)
	return ""
}

// Every keyway leg of an enforced sidecar is mutual TLS with mesh certificates (issue 11): the
// clusters to the gateway (tunnel and key service, both on the tunnel port, HTTP/2) present the
// sidecar's own certificate and trust the mesh root from istio-agent's SDS, the same SDS
// configurations Istio gives its own ISTIO_MUTUAL clusters in the same CDS response, offer ALPN
// h2 and TLS 1.2 to 1.3, and accept only the gateway's identity (URI SAN, exact); the keyway
// inbound listener (15181) requires a client certificate, presents the sidecar's and accepts the
// gateway's identity only. Nothing keyway sends goes in cleartext.
func TestKeywayLegsAreMutualTLSWithMeshCertificates(t *testing.T) {
	legs := 0
	n := each(t, enforced, func(t *testing.T, w *world, sc *sidecar) {
		id := gatewayIdentity(t, w)
		mutual := istioMutual(t, sc)
		if mutual == nil {
			t.Fatalf("no ISTIO_MUTUAL cluster (transport socket match tlsMode-istio) in CDS to compare with")
		}
		for _, name := range []string{gatewayCluster, keyServiceCluster} {
			c := clusterNamed(sc, name)
			if c == nil {
				t.Errorf("no cluster %s", name)
				continue
			}
			legs++
			checkGatewayCluster(t, c)
			ctx := &tlsv3.UpstreamTlsContext{}
			if !unpackSocket(t, "cluster "+name, c.GetTransportSocket(), ctx) {
				continue
			}
			checkCommon(t, "cluster "+name, ctx.GetCommonTlsContext(), mutual, id)
		}
		l := listenerNamed(sc, inboundListener)
		if l == nil {
			t.Errorf("no listener %s", inboundListener)
			return
		}
		for _, fc := range chains(l) {
			legs++
			ctx := &tlsv3.DownstreamTlsContext{}
			where := "listener " + inboundListener
			if !unpackSocket(t, where, fc.GetTransportSocket(), ctx) {
				continue
			}
			if !ctx.GetRequireClientCertificate().GetValue() {
				t.Errorf("%s: require_client_certificate is not set: any client may deliver", where)
			}
			checkCommon(t, where, ctx.GetCommonTlsContext(), mutual, id)
		}
	})
	t.Logf("%d sidecars, %d keyway legs with mutual TLS checked against Istio's own ISTIO_MUTUAL configuration", n, legs)
}

// istioMutual returns the TLS context Istio itself generates for mesh mTLS in this sidecar's CDS:
// the `tlsMode-istio` transport socket match of an outbound cluster (auto mTLS).
func istioMutual(t *testing.T, sc *sidecar) *tlsv3.CommonTlsContext {
	t.Helper()
	for _, c := range sc.clusters {
		for _, m := range c.GetTransportSocketMatches() {
			if m.GetName() != "tlsMode-istio" {
				continue
			}
			ctx := &tlsv3.UpstreamTlsContext{}
			if unpackSocket(t, "cluster "+c.GetName(), m.GetTransportSocket(), ctx) {
				return ctx.GetCommonTlsContext()
			}
		}
	}
	return nil
}

func unpackSocket(t *testing.T, where string, ts *core.TransportSocket, into proto.Message) bool {
	t.Helper()
	if ts == nil {
		t.Errorf("%s: no transport socket: cleartext", where)
		return false
	}
	if ts.GetName() != "envoy.transport_sockets.tls" || ts.GetTypedConfig().GetTypeUrl() != typeURL(into) {
		t.Errorf("%s: transport socket %s (%s), want envoy.transport_sockets.tls with %s", where, ts.GetName(), ts.GetTypedConfig().GetTypeUrl(), typeURL(into))
		return false
	}
	if err := ts.GetTypedConfig().UnmarshalTo(into); err != nil {
		t.Fatalf("%s: %v", where, err)
	}
	return true
}

// checkCommon: own certificate and root from Istio's SDS, exactly as Istio's ISTIO_MUTUAL; the
// peer is the gateway (URI SAN, exact) and nothing else; ALPN h2; TLS 1.2 to 1.3.
func checkCommon(t *testing.T, where string, got, mutual *tlsv3.CommonTlsContext, id string) {
	t.Helper()
	wantCert := []*tlsv3.SdsSecretConfig{model.ConstructSdsSecretConfig(model.SDSDefaultResourceName)}
	if d := cmp.Diff(wantCert, got.GetTlsCertificateSdsSecretConfigs(), protocmp.Transform()); d != "" {
		t.Errorf("%s: own certificate is not istio-agent's SDS %q (-want +got):\n%s", where, model.SDSDefaultResourceName, d)
	}
	if d := cmp.Diff(mutual.GetTlsCertificateSdsSecretConfigs(), got.GetTlsCertificateSdsSecretConfigs(), protocmp.Transform()); d != "" {
		t.Errorf("%s: own certificate differs from Istio's ISTIO_MUTUAL clusters (-istio +keyway):\n%s", where, d)
	}
	cv := got.GetCombinedValidationContext()
	if cv == nil {
		t.Errorf("%s: no combined validation context (SDS root and SAN match): the peer is not verified", where)
		return
	}
	wantRoot := model.ConstructSdsSecretConfig(model.SDSRootResourceName)
	if d := cmp.Diff(wantRoot, cv.GetValidationContextSdsSecretConfig(), protocmp.Transform()); d != "" {
		t.Errorf("%s: root is not istio-agent's SDS %q (-want +got):\n%s", where, model.SDSRootResourceName, d)
	}
	if d := cmp.Diff(mutual.GetCombinedValidationContext().GetValidationContextSdsSecretConfig(), cv.GetValidationContextSdsSecretConfig(), protocmp.Transform()); d != "" {
		t.Errorf("%s: root differs from Istio's ISTIO_MUTUAL clusters (-istio +keyway):\n%s", where, d)
	}
	dv := cv.GetDefaultValidationContext()
	if len(dv.GetMatchSubjectAltNames()) != 0 {
		t.Errorf("%s: untyped match_subject_alt_names %v also accept DNS or e-mail SANs", where, dv.GetMatchSubjectAltNames())
	}
	sans := dv.GetMatchTypedSubjectAltNames()
	if len(sans) != 1 || sans[0].GetSanType() != tlsv3.SubjectAltNameMatcher_URI || sans[0].GetMatcher().GetExact() != id ||
		sans[0].GetMatcher().GetIgnoreCase() {
		t.Errorf("%s: the peer must be the gateway's identity (URI SAN exactly %s), got %v", where, id, sans)
	}
	if d := cmp.Diff([]string{"h2"}, got.GetAlpnProtocols()); d != "" {
		t.Errorf("%s: ALPN (-want +got):\n%s", where, d)
	}
	p := got.GetTlsParams()
	if p.GetTlsMinimumProtocolVersion() != tlsv3.TlsParameters_TLSv1_2 || p.GetTlsMaximumProtocolVersion() != tlsv3.TlsParameters_TLSv1_3 {
		t.Errorf("%s: TLS versions %v to %v, want TLSv1_2 to TLSv1_3", where, p.GetTlsMinimumProtocolVersion(), p.GetTlsMaximumProtocolVersion())
	}
}

// checkGatewayCluster: the tunnel port (tunnel and key service alike), HTTP/2.
func checkGatewayCluster(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	for _, le := range c.GetLoadAssignment().GetEndpoints() {
		for _, e := range le.GetLbEndpoints() {
			if p := e.GetEndpoint().GetAddress().GetSocketAddress().GetPortValue(); p != tunnelPort {
				t.Errorf("cluster %s: port %d, want the gateway's tunnel port %d", c.GetName(), p, tunnelPort)
			}
		}
	}
	opts := &httpopts.HttpProtocolOptions{}
	a := c.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
	if a == nil || a.UnmarshalTo(opts) != nil || opts.GetExplicitHttpConfig().GetHttp2ProtocolOptions() == nil {
		t.Errorf("cluster %s: not HTTP/2 (typed_extension_protocol_options %v)", c.GetName(), c.GetTypedExtensionProtocolOptions())
	}
}

func clusterNamed(sc *sidecar, name string) *cluster.Cluster {
	for _, c := range sc.clusters {
		if c.GetName() == name {
			return c
		}
	}
	return nil
}

func listenerNamed(sc *sidecar, name string) *listener.Listener {
	for _, l := range sc.listeners {
		if l.GetName() == name {
			return l
		}
	}
	return nil
}

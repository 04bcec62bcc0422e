package xds

import (
	"os"
	"testing"

	"istio.io/istio/pilot/pkg/features"
	"istio.io/istio/pkg/log"
)

// TestMain silences pilot's own logging (its fake cluster logs CRD noise at error level); what
// keyway needs from pilot is asserted, not read from logs.
func TestMain(m *testing.M) {
	for _, s := range log.Scopes() {
		s.SetOutputLevel(log.NoneLevel)
	}
	// Istio builds a sidecar's HBONE inbound listeners (15008 and the internal listener behind it)
	// when this is on (it is with ambient installed) and the proxy asks (ENABLE_HBONE, which the
	// harness's "+hbone" sidecars set): the inbound assertions then cover them too.
	features.EnableSidecarHBONEListening = true
	os.Exit(m.Run())
}

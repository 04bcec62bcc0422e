package xds

import (
	"os"
	"testing"

	"istio.io/istio/pkg/log"
)

// TestMain silences pilot's own logging (its fake cluster logs CRD noise at error level); what
// keyway needs from pilot is asserted, not read from logs.
func TestMain(m *testing.M) {
	for _, s := range log.Scopes() {
		s.SetOutputLevel(log.NoneLevel)
	}
	os.Exit(m.Run())
}

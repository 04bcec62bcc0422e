package xds

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"istio.io/istio/pkg/util/protomarshal"
)

// dumpEnv names the directory the data-path dump goes to; nothing is written when it is unset.
const dumpEnv = "KEYWAY_XDS_DUMP"

// zoneAnnotation: the pod annotation that places a workload in a zone (samples/shop).
const zoneAnnotation = "keyway.io/zone"

// dumpDataPath writes, when $KEYWAY_XDS_DUMP is set, what pilot generates for every workload of
// samples/shop as the sample has it (every one enforced, ops/prometheus included: the e2e bed
// runs a keyway sidecar for each), each from the overlay of its own zone, without HBONE: the
// configuration the e2e bed turns into its sidecars' static bootstraps (issue 12, part 3;
// e2e/src/envoy/istio.rs). Under $KEYWAY_XDS_DUMP/<release>/:
//
//	mesh.json                       the fixture's addresses: pod IPs by workload, Service VIPs
//	<namespace>-<pod>/lds.json      Listeners          (JSON arrays of the resources as pilot
//	<namespace>-<pod>/cds.json      Clusters            generates them, protojson)
//	<namespace>-<pod>/rds.json      RouteConfigurations (only when a listener uses RDS)
//	<namespace>-<pod>/eds.json      ClusterLoadAssignments of the EDS clusters
//	<namespace>-<pod>/ecds.json     TypedExtensionConfigs of every name the listeners reference
//	<namespace>-<pod>/node.json     the node (id, cluster, metadata) as istio-agent's bootstrap has it
func dumpDataPath(t *testing.T, release, version string) {
	t.Helper()
	root := os.Getenv(dumpEnv)
	if root == "" {
		return
	}
	dir := filepath.Join(root, release)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	shop := loadShopExcept(t, nil)
	addresses := map[string]map[string]string{"pods": {}, "services": {}}
	for _, p := range shop.pods {
		addresses["pods"][p.namespace+"/"+strings.TrimSuffix(p.name, "-0")] = p.ip
	}
	for _, s := range shop.services {
		addresses["services"][s.namespace+"/"+s.name] = s.vip
	}
	writeJSON(t, filepath.Join(dir, "mesh.json"), addresses)
	dumped := 0
	for _, o := range overlays(t) {
		s := server(t, shop, o.istio, o.kube)
		for _, p := range shop.pods {
			if p.annotations[zoneAnnotation] != o.zone {
				continue
			}
			sc := generate(t, s, p, version, false)
			podDir := filepath.Join(dir, p.namespace+"-"+p.name)
			writeMessages(t, filepath.Join(podDir, "lds.json"), messages(sc.listeners))
			writeMessages(t, filepath.Join(podDir, "cds.json"), messages(sc.clusters))
			if len(sc.sim.Routes) > 0 {
				writeMessages(t, filepath.Join(podDir, "rds.json"), messages(sc.sim.Routes))
			}
			writeMessages(t, filepath.Join(podDir, "eds.json"), messages(s.Endpoints(sc.proxy)))
			writeMessages(t, filepath.Join(podDir, "ecds.json"), messages(sc.ecds))
			writeJSON(t, filepath.Join(podDir, "node.json"), map[string]any{
				"id":       "sidecar~" + p.ip + "~" + sc.proxy.ID + "~" + p.namespace + ".svc.cluster.local",
				"cluster":  sc.proxy.Metadata.WorkloadName + "." + p.namespace,
				"metadata": sc.proxy.Metadata,
			})
			dumped++
		}
	}
	if dumped != len(shop.pods) {
		t.Fatalf("data-path dump: %d of %d pods dumped (a pod's %s names no overlay?)", dumped, len(shop.pods), zoneAnnotation)
	}
	t.Logf("data-path dump: %d sidecars under %s", dumped, dir)
}

// writeMessages writes msgs as one JSON array (protojson, as pilot's debug endpoints print).
func writeMessages(t *testing.T, path string, msgs []proto.Message) {
	t.Helper()
	var b strings.Builder
	b.WriteString("[\n")
	for i, m := range msgs {
		text, err := protomarshal.ToJSONWithIndent(m, "  ")
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if i > 0 {
			b.WriteString(",\n")
		}
		b.WriteString(text)
	}
	b.WriteString("\n]\n")
	writeFile(t, path, []byte(b.String()))
}

func writeJSON(t *testing.T, path string, v any) {
	t.Helper()
	text, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	writeFile(t, path, append(text, '\n'))
}

func writeFile(t *testing.T, path string, text []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, text, 0o644); err != nil {
		t.Fatal(err)
	}
}

// Validates the custom resources in a JSON array (stdin) against their CRDs' schemas, as
// published in @kubernetes-models/*. Prints one line per resource; exits 1 on any error
// or on a custom resource kind it has no schema for (so nothing passes unchecked).
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { Certificate } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate";
import { Issuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Issuer";

const models = {
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "cert-manager.io/v1/Certificate": Certificate,
  "cert-manager.io/v1/Issuer": Issuer,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = false;
for (const doc of JSON.parse(input)) {
  const key = `${doc.apiVersion}/${doc.kind}`;
  const Model = models[key];
  if (!Model) {
    console.log(`no schema: ${key} ${doc.metadata?.name}`);
    failed = true;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`valid: ${key} ${doc.metadata.name}`);
  } catch (e) {
    console.log(`invalid: ${key} ${doc.metadata?.name}: ${e.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);

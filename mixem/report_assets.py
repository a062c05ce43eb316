"""The report pages' style sheet and the map's script (hover shows a point's image, click goes to its cluster)."""

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa;max-width:1400px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:26px 0 6px}
.meta{color:#555;font-size:13px;margin-bottom:12px;max-width:1000px} table{border-collapse:collapse;font-size:13px}
td,th{padding:2px 10px;text-align:right} th{text-align:left;font-weight:600} td.b{text-align:left}
.bar{background:#4a7bd0;height:10px;display:inline-block;vertical-align:middle}
.sw{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:middle}
.grid{display:flex;flex-wrap:wrap;gap:4px;margin:4px 0 10px} .grid img{width:96px;height:96px;object-fit:cover;
border:1px solid #ddd;background:#fff} .sub{color:#666;font-size:12px;margin-top:6px}
.miss{display:inline-block;width:96px;height:96px;font-size:11px;color:#999;border:1px dashed #ccc;text-align:center}
.fig{max-width:100%;display:block;margin:6px 0} .mapbox{position:relative;display:inline-block;max-width:100%}
#map{max-width:100%;cursor:crosshair;display:block}
.dg{display:inline-block;vertical-align:top;margin:0 18px 6px 0}
#tip{position:fixed;display:none;pointer-events:none;background:#fff;border:1px solid #bbb;padding:6px;
font-size:12px;max-width:260px;box-shadow:0 2px 8px rgba(0,0,0,.2);z-index:9;word-break:break-all}
#tip img{width:128px;height:128px;object-fit:contain;display:block;background:#eee;margin-bottom:4px}
"""

MAP_JS = """
(function(){
  const map=document.getElementById('map'), box=document.getElementById('mapdata'), tip=document.getElementById('tip');
  if(!map||!box)return;
  const P=JSON.parse(box.textContent); let hit=-1;
  function nearest(e){
    const r=map.getBoundingClientRect(); let best=-1, bd=81;
    for(let i=0;i<P.x.length;i++){
      const dx=P.x[i]*r.width-(e.clientX-r.left), dy=P.y[i]*r.height-(e.clientY-r.top), d=dx*dx+dy*dy;
      if(d<bd||(d===bd&&P.r[i]>=0)){bd=d;best=i;}
    }
    return best;
  }
  map.addEventListener('mousemove',function(e){
    hit=nearest(e);
    if(hit<0){tip.style.display='none';return;}
    tip.replaceChildren();
    if(P.r[hit]>=0){const t=document.getElementById('t'+P.r[hit]);
      if(t){const im=document.createElement('img');im.src=t.src;tip.appendChild(im);}}
    const a=document.createElement('div');a.textContent='cluster '+P.c[hit];a.style.fontWeight='600';tip.appendChild(a);
    const b=document.createElement('div');b.textContent=P.p[hit];tip.appendChild(b);
    tip.style.left=Math.min(e.clientX+14,window.innerWidth-280)+'px';
    tip.style.top=Math.min(e.clientY+14,window.innerHeight-200)+'px';tip.style.display='block';
  });
  map.addEventListener('mouseleave',function(){tip.style.display='none';hit=-1;});
  map.addEventListener('click',function(e){const i=nearest(e);if(i>=0)location.hash='#c'+P.c[i];});
})();
"""
